"""Steering across regions, the full simulation (issue 16): does each caller land on the
cluster with the shortest first hop, at first contact and after learning? Figures are
printed, never asserted; results are recorded in BENCHMARKS.md. Needs root.

    ./bazelw run //tests/bench:regions                # 6 regions, 42 cities x 2 networks, 3 calls
    ./bazelw run //tests/bench:regions -- --cities lima,rio --regions gru,iad --calls 2

The world is tools/netsim/world.py (five regions with transceivers and a relay-only PoP in
Sydney, every city --networks client networks (hosts with their own /24s at the city,
sharing its routes; every city's first network calls before any second one), delays from
great-circle distance with a fibre factor, the bad routes of world.BAD_ROUTES plus
--bad-route ones); the edge on it
and the calls are tools/netsim/regions.py, the same code as tests/netsim/regions_test.py.
Every client first probes every relay VIP (UDP echo, least of 5: the best first hop),
then places --calls aiortc calls one after the other, each held until geosteer holds the
RTT its transceiver measured for the client's prefix (so the next call is steered by it).

Per client the table gives its best VIP and RTT, then per call the cluster of the
transceiver, the VIP media entered at, that first hop as the client probed it, and `*`
when within 10 % or 5 ms of the best. Then (unless --no-route-fix) every bad route is
fixed while the edge runs, and once geosteer forgot their slow RTTs (rtt_max_age_s, 180 s
here) their clients call twice more: the fixed route is learned again. Progress goes to
stderr; the last line is the summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.netsim.calls import API_KEY
from tools.netsim import net, regions
from tools.netsim.world import BAD_ROUTES, CITIES, REGIONS, geo_guess, make_world

# A third bad route for the benchmark: Mumbai to Singapore around the Cape (cable cuts
# send traffic the long way), so Mumbai's fastest region is Frankfurt, not Singapore.
EXTRA_BAD_ROUTES = {("mumbai", "sin"): 260.0}
# No failover to watch here: heartbeats with room for a busy host's loop lag, so a loaded
# transceiver is not dropped from routing for a missed beat.
# Measured RTTs forgotten after 180 s, so the fixed routes are learned again within a run
# (the default is 30 min), yet a bad route a city's first network measured is still known
# when its second network calls, about 2 min later (at 30 s it was forgotten by then).
TIMERS = regions.Timers(heartbeat_interval_ms=1000, heartbeat_ttl_ms=6000, rtt_max_age_s=180.0)


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def _bad_route(text: str) -> tuple[tuple[str, str], float]:
    """'city:region=ms'."""
    pair, _, ms = text.partition("=")
    city, _, region = pair.partition(":")
    if not city or not region or not ms:
        raise argparse.ArgumentTypeError(f"{text!r}: expected city:region=ms")
    return (city, region), float(ms)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def route_fix(edge: regions.RegionsEdge, learn_timeout_s: float) -> list[regions.Row]:
    """The bad routes are fixed (their pairs take their distance again) while geosteer still
    holds their slow RTTs; once those aged out (rtt_max_age_s after their last report,
    polled), each of their clients probes again and calls twice: distance sends the first
    call back to the nearest region, whose new RTT is learned."""
    world = edge.world
    bad = [
        (client, world.region_named(region))
        for client in world.clients
        for city, region in world.bad_routes
        if city == client.city.name
    ]
    edge.set_bad_routes({})
    progress(f"{len(bad)} bad routes fixed; waiting for geosteer to forget them")
    deadline = time.monotonic() + 3 * TIMERS.rtt_max_age_s
    for client, region in bad:
        while edge.measured(client, region.cluster_id, area=True) and time.monotonic() < deadline:
            time.sleep(0.5)
    progress("forgotten; the clients of the fixed routes call again")
    return regions.steer(
        edge,
        [client for client, _ in bad],
        calls=2,
        parallel=len(bad),
        learn_timeout_s=learn_timeout_s,
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--regions", default="", help="comma-separated names; default all")
    parser.add_argument("--cities", default="", help="comma-separated names; default all")
    parser.add_argument("--calls", type=int, default=3, help="calls per client, in turn")
    parser.add_argument("--parallel", type=int, default=4, help="clients calling at once")
    parser.add_argument("--networks", type=int, default=2, help="client networks per city (1 to 5)")
    parser.add_argument(
        "--bad-route", type=_bad_route, action="append", default=[], help="city:region=ms"
    )
    parser.add_argument("--learn-timeout-s", type=float, default=30.0)
    parser.add_argument("--workdir", default="", help="keep services.log here; default a temp dir")
    parser.add_argument(
        "--no-route-fix",
        action="store_true",
        help="skip the second phase: bad routes fixed, their clients call again",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the regions benchmark needs root (network namespaces)", file=sys.stderr)
        return 1
    if not 1 <= args.networks <= 5:
        parser.error("--networks: 1 to 5")
    region_names = _names(args.regions, [r.name for r in REGIONS], "regions")
    city_names = _names(args.cities, [c.name for c in CITIES], "cities")
    bad_routes = {**BAD_ROUTES, **EXTRA_BAD_ROUTES, **dict(args.bad_route)}
    world = make_world(
        tuple(r for r in REGIONS if not region_names or r.name in region_names),
        tuple(c for c in CITIES if not city_names or c.name in city_names),
        {k: v for k, v in bad_routes.items() if not city_names or k[0] in city_names},
        networks=args.networks,
    )
    progress(
        f"{len(world.regions)} regions, {len(world.clients)} clients, "
        f"{len(world.bad_routes)} bad routes; building the testbed"
    )
    net.sweep()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="regions-") as scratch,
        regions.world_edge(world, Path(args.workdir or scratch), API_KEY, TIMERS) as edge,
    ):
        progress(f"edge up in {time.monotonic() - started:.0f} s; calling")
        rows = regions.steer(
            edge,
            list(world.clients),
            calls=args.calls,
            parallel=args.parallel,
            learn_timeout_s=args.learn_timeout_s,
            progress=progress,
        )
        fixed = [] if args.no_route_fix else route_fix(edge, args.learn_timeout_s)
    progress(f"done in {time.monotonic() - started:.0f} s")
    print("\n".join(regions.table(rows)))
    if fixed:
        print(f"after the bad routes were fixed and rtt_max_age_s ({TIMERS.rtt_max_age_s:g} s):")
        print("\n".join(regions.table(fixed)[1:]))
        print(
            f"fixed routes: first call within 10 %: {regions.share_within(fixed, 0):.0f} % of "
            f"{len(fixed)} clients; after {len(fixed[0].landings)} calls: "
            f"{regions.share_within(fixed, -1):.0f} %"
        )
    misses = [r for r in rows if not r.within(0)]
    for row in misses:
        guess = geo_guess(world, row.client).name
        print(f"first contact missed: {row.client.name} (distance guess {guess})")
    plain = [r for r in rows if not any(r.client.city.name == c for c, _ in world.bad_routes)]
    print(
        f"first contact, clients without a bad route: {regions.share_within(plain, 0):.0f} % "
        f"of {len(plain)}"
    )
    if args.networks > 1:
        first = [r for r in rows if r.client.isp == 1]
        later = [r for r in rows if r.client.isp > 1]
        print(
            f"first contact, each city's first network: {regions.share_within(first, 0):.0f} % "
            f"of {len(first)}; its later networks: {regions.share_within(later, 0):.0f} % "
            f"of {len(later)}"
        )
    learned = sum(all(landing.learned for landing in row.landings) for row in rows)
    print(f"calls whose RTT geosteer learned: every call of {learned} of {len(rows)} clients")
    print(regions.summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
