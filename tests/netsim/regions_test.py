"""Steering across regions on the testbed (issue 16), reduced for CI: three regions (fra,
iad, gru) and a relay-only PoP in Sydney, four client cities with delays from distance and
a second network in Lima, one bad route (Lima to São Paulo goes through Miami) that is
learned, shared with Lima's other network, fixed, and learned again. Real aiortc calls
from each client host; first hops measured by the clients themselves (UDP echo on every
VIP).

The full simulation (six regions, 42 cities with two networks each, three bad routes,
three calls each) is the benchmark `./bazelw run //tests/bench:regions`, on the same code
(tools/netsim/regions.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult
from tests.netsim.calls import API_KEY
from tools.netsim import regions
from tools.netsim.regions import RegionsEdge, Timers, world_edge
from tools.netsim.world import CITIES, REGIONS, RELAY_PORT, Client, World

REGION_NAMES = ("fra", "iad", "gru", "syd")
CITY_NAMES = ("london", "newyork", "lima", "perth")
WAIT_S = 30.0
# Short, so the fixed route is learned again within the test; long enough that Lima's
# slow São Paulo RTT outlives its next call and its other network's first one.
RTT_MAX_AGE_S = 20.0


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegionsEdge]:
    cities = [c for c in CITIES if c.name in CITY_NAMES]
    lima = next(c for c in cities if c.name == "lima")
    clients = [Client(i, city) for i, city in enumerate(cities)]
    clients.append(Client(len(clients), lima, isp=2))  # another ISP's /24 in Lima
    world = World(
        tuple(r for r in REGIONS if r.name in REGION_NAMES),
        tuple(clients),
        {("lima", "gru"): 170.0},
    )
    workdir: Path = tmp_path_factory.mktemp("regions")
    # One session per transceiver: the spill test fills clusters with one call each.
    timers = Timers(max_sessions=1, rtt_max_age_s=RTT_MAX_AGE_S)
    with world_edge(world, workdir, API_KEY, timers) as running:
        yield running


def client(edge: RegionsEdge, name: str) -> Client:
    return next(c for c in edge.world.clients if c.name == name)


def region_id(edge: RegionsEdge, name: str) -> int:
    return next(r.cluster_id for r in edge.world.regions if r.name == name)


async def until(what: str, check: Callable[[], object], timeout_s: float = WAIT_S) -> None:
    """Polls a blocking check (a gRPC query) in a thread until it holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def active(edge: RegionsEdge) -> dict[int, int]:
    """Sessions per cluster as geosteer last heard them from the transceivers."""
    return {
        c.cluster_id: sum(
            n.active_sessions for n in c.nodes if n.kind == regions.NODE_KIND_TRANSCEIVER
        )
        for c in edge.topology().clusters
    }


async def idle(edge: RegionsEdge) -> None:
    await until("every session gone from geosteer", lambda: not any(active(edge).values()))


@pytest.mark.timeout_s(120)
async def test_first_contact_takes_the_shortest_first_hop(edge: RegionsEdge) -> None:
    rows = []
    for city in ("london", "newyork", "perth"):
        await idle(edge)
        rows += await asyncio.to_thread(
            regions.steer, edge, [client(edge, city)], calls=1, parallel=1
        )
    print("\n".join(regions.table(rows)))
    for row in rows:
        assert row.within(0), row


def steer_one(edge: RegionsEdge, who: Client, calls: int) -> regions.Row:
    [row] = regions.steer(edge, [who], calls=calls, parallel=1)
    print(regions.table_line(row))
    return row


@pytest.mark.timeout_s(150)
async def test_a_bad_route_is_learned_shared_in_its_area_and_learned_again_once_fixed(
    edge: RegionsEdge,
) -> None:
    lima, lima_2 = client(edge, "lima"), client(edge, "lima-2")
    gru = region_id(edge, "gru")
    await idle(edge)
    row = await asyncio.to_thread(steer_one, edge, lima, 2)
    # The nearest region by distance is the slow one; its RTT is learned and the next
    # call takes the fastest first hop.
    assert row.landings[0].vip_region == "gru", row
    assert all(landing.learned for landing in row.landings), row
    assert row.landings[1].vip_region == "iad", row
    assert row.within(1), row
    # Lima's other network was never measured: its first call already avoids the bad
    # route, with what Lima's first network measured (the area's RTTs).
    await idle(edge)
    other = await asyncio.to_thread(steer_one, edge, lima_2, 1)
    assert other.landings[0].vip_region == "iad", other
    assert other.within(0), other

    # The route is fixed. Once the slow RTT aged out (rtt_max_age_s after its last
    # report), distance sends Lima to São Paulo again and the new RTT is learned.
    edge.set_bad_routes({})
    await until(
        "geosteer to forget the slow route",
        lambda: edge.measured(lima, gru, area=True) is False,
        timeout_s=3 * RTT_MAX_AGE_S,
    )
    await idle(edge)
    after = await asyncio.to_thread(steer_one, edge, lima, 2)
    assert [landing.vip_region for landing in after.landings] == ["gru", "gru"], after
    assert all(landing.learned for landing in after.landings), after
    assert after.within(0), after
    assert after.within(1), after


@pytest.mark.timeout_s(120)
async def test_a_far_client_enters_at_the_nearest_relay_and_its_transceiver_is_elsewhere(
    edge: RegionsEdge,
) -> None:
    """Perth: the Sydney PoP is the short first hop (about 51 ms), São Paulo's transceiver
    is far, and end to end the direct path to São Paulo's relay (about 200 ms) beats the
    PoP plus the backbone (about 213 ms), so with both VIPs in the answer ICE would take
    the direct one. The answer has the PoP's VIP only, and media enters there."""
    await idle(edge)
    perth = client(edge, "perth")
    pop = edge.world.region(region_id(edge, "syd"))
    result = await asyncio.to_thread(edge.call, perth)
    assert result.status == 201, result.error_body
    assert regions.candidates(result.answer_sdp) == [pop.vip]
    assert result.remote_candidate == (pop.vip, RELAY_PORT)
    cluster = regions.cluster_of(result)
    assert cluster != pop.cluster_id  # the PoP has no transceivers
    # Media entered at the PoP's relay, which forwarded to the transceiver's region: that
    # first hop is the short one.
    transceiver_region = edge.world.region(cluster)
    near = await asyncio.to_thread(edge.probe_ms, perth, pop)
    far = await asyncio.to_thread(edge.probe_ms, perth, transceiver_region)
    assert near * 3 < far, (near, far)
    audio = result.audio()
    assert len(audio) > 0  # media came back through the PoP


class HeldCall:
    """A call from a client host held open until released (a thread of its own)."""

    def __init__(self, pool: ThreadPoolExecutor, edge: RegionsEdge, who: Client) -> None:
        self.connected = threading.Event()
        self.release = threading.Event()

        async def hold(pc: RTCPeerConnection, result: CallResult) -> None:
            self.connected.set()
            await asyncio.to_thread(self.release.wait, WAIT_S * 4)

        self.future: Future[CallResult] = pool.submit(edge.call, who, hold)

    async def started(self) -> CallResult | None:
        """None once connected (and held); the result when it ended without connecting."""
        while not self.connected.is_set():
            if self.future.done():
                return self.future.result()
            await asyncio.sleep(0.05)
        return None


@pytest.mark.timeout_s(180)
async def test_a_full_cluster_spills_to_the_next_nearest_and_refuses_only_when_all_are_full(
    edge: RegionsEdge,
) -> None:
    await idle(edge)
    london = client(edge, "london")
    fra = edge.world.region(region_id(edge, "fra"))
    # London's clusters by distance: fra, iad, gru. One session each fills them in turn.
    expected = [region_id(edge, n) for n in ("fra", "iad", "gru")]
    held: list[HeldCall] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        try:
            for count, cluster in enumerate(expected, 1):
                call = HeldCall(pool, edge, london)
                held.append(call)
                ended = await call.started()
                assert ended is None, (ended.status, ended.error_body) if ended else None
                await until(
                    f"geosteer to see {count} sessions",
                    lambda n=count: sum(active(edge).values()) == n,  # type: ignore[misc]
                )
                assert active(edge)[cluster] == 1, active(edge)
            refused = await asyncio.to_thread(edge.call, london)
            assert refused.status == 503, (refused.status, refused.error_body)
        finally:
            for call in held:
                call.release.set()
        results = [call.future.result(timeout=WAIT_S) for call in held]
    assert [regions.cluster_of(r) for r in results] == expected
    # The nearest relay (fra's) is the only one in every answer, also for the calls whose
    # transceiver is in another region (their own relays are far farther): media enters
    # at fra's relay and crosses the backbone.
    assert [regions.candidates(r.answer_sdp) for r in results] == [[fra.vip]] * 3
    assert [r.remote_candidate for r in results] == [(fra.vip, RELAY_PORT)] * 3


@pytest.mark.timeout_s(120)
async def test_a_cluster_whose_heartbeats_stop_gets_no_new_calls_and_its_callers_fail_over(
    edge: RegionsEdge,
) -> None:
    await idle(edge)
    newyork = client(edge, "newyork")
    iad = edge.world.region(region_id(edge, "iad"))
    assert (await asyncio.to_thread(edge.route, newyork)).cluster.cluster_id == iad.cluster_id
    killed = edge.kill_transceivers(iad)
    await until(
        "geosteer to route New York elsewhere",
        lambda: edge.route(newyork).cluster.cluster_id != iad.cluster_id,
    )
    # A figure, not an assert (the target, 3 heartbeat intervals, is the lease TTL here).
    print(
        f"iad's transceiver killed: New York routed elsewhere "
        f"{(time.monotonic() - killed) * 1000:.0f} ms later (heartbeat interval "
        f"{edge.timers.heartbeat_interval_ms} ms, ttl {edge.timers.heartbeat_ttl_ms} ms)"
    )
    result = await asyncio.to_thread(edge.call, newyork)
    assert result.status == 201, result.error_body
    landed = regions.cluster_of(result)
    # The next-nearest region with transceivers (fra: 6,200 km; gru: 7,700 km).
    assert landed == region_id(edge, "fra")
    # iad's relay still runs: media enters there, the shortest first hop.
    assert result.remote_candidate == (iad.vip, RELAY_PORT)
    first_hop = await asyncio.to_thread(edge.probe_ms, newyork, iad)
    direct = await asyncio.to_thread(edge.probe_ms, newyork, edge.world.region(landed))
    assert first_hop * 3 < direct, (first_hop, direct)
