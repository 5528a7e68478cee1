"""A real call through the relay while a third host floods it (issue 18): 20k, 100k and the
most pps the C generator (tests/bench/floodgen.c) reaches, of random bytes, forged
MESSAGE-INTEGRITY with the call's USERNAME and unbound DTLS-looking packets, from 64 ports
of one host and from random addresses of a spoofed /16; the relay on its native path and on
the Python path, next to the same flood against the C reference forwarder
(tests/bench/ref_forwarder.c on the relay host) carrying a paced 50 pps probe stream from
the caller's host.

    ./bazelw run //tests/bench:relay_flood                       # every row, 5 s floods
    ./bazelw run //tests/bench:relay_flood -- --paths on --rates 100000 --kinds forged

Needs root (network namespaces). Gap: the longest time between two of the agent's 20 ms
frames at the caller during the flood; for the reference, between two probes at its sink.
CPU: % of one core (the relay: all its workers summed). Kernel drops: the drops column of
/proc/net/udp for the flooded port's sockets on the relay host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.netsim import relay_faults
from tests.netsim.relay_faults import Figures
from tools.netsim import net
from tools.netsim.edge import NetEdge

HERE = Path(os.path.abspath(__file__)).parent
REF_PORT = 3479  # the reference forwarder, beside the relay on its public address
SINK_PORT = 9479  # where it forwards: a C sink on the cluster's internal address
PROBE_PPS = 50
TARGET_GAP_MS = 60.0
TARGET_PPS = 100_000


@dataclass(frozen=True)
class Tools:
    floodgen: Path
    forwarder: Path


def _binary(name: str) -> Path:
    """A cc_binary of this package from the runfiles."""
    if (HERE / name).is_file():
        return HERE / name
    raise SystemExit(f"{name} missing: run through ./bazelw run //tests/bench:relay_flood")


async def reference_row(
    edge: NetEdge, tools: Tools, pps: int, seconds: float, kind: str, spoof: bool
) -> Figures:
    """The same flood against the C reference forwarder, with a paced probe stream from the
    client host through it to a sink on the cluster host."""
    tb, addr = edge.testbed, edge.addresses
    if spoof:
        relay_faults.spoof_route(edge)
    forwarder = tb.start(
        tb.ns("relay"),
        [
            str(tools.forwarder),
            str(REF_PORT),
            str(SINK_PORT),
            addr.relay_public,
            addr.cluster_internal,
        ],
        name="ref_forwarder",
        stdout=subprocess.PIPE,
        text=True,
    )
    sink = tb.start(
        tb.ns("cluster"),
        [
            str(tools.floodgen),
            "probe-sink",
            addr.cluster_internal,
            str(SINK_PORT),
            str(seconds + 4),
        ],
        name="probe-sink",
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for process in (forwarder, sink):
            assert process.stdout is not None
            line = await asyncio.to_thread(process.stdout.readline)
            if not line.startswith("ready"):
                raise AssertionError(f"{process.args!r}: {line!r}")
        probe = tb.start(
            tb.ns("client"),
            [
                str(tools.floodgen),
                "probe-send",
                addr.relay_public,
                str(REF_PORT),
                str(PROBE_PPS),
                str(seconds + 2),
            ],
            name="probe-send",
            stdout=subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)
        drops0 = relay_faults.socket_drops(edge, "relay", REF_PORT)
        argv = relay_faults.floodgen_argv(
            tools.floodgen, (addr.relay_public, REF_PORT), pps, seconds, kind, "x:y", spoof
        )
        cpu0, t0 = relay_faults.cpu_seconds(forwarder.pid), time.monotonic()
        flood = tb.start(tb.ns("other"), argv, name="floodgen", stdout=subprocess.PIPE, text=True)
        out, _ = await asyncio.to_thread(flood.communicate, None, seconds + 30)
        cpu1, t1 = relay_faults.cpu_seconds(forwarder.pid), time.monotonic()
        drops1 = relay_faults.socket_drops(edge, "relay", REF_PORT)
        await asyncio.to_thread(probe.wait, 30)
        result, _ = await asyncio.to_thread(sink.communicate, None, 30)
    finally:
        for process in (forwarder, sink):
            if process.poll() is None:
                process.kill()
                process.wait(10)
    seen = relay_faults.parse_counts(result.strip().splitlines()[-1])
    sent = relay_faults.parse_counts(out.strip().splitlines()[-1])
    counts = {
        "offered_pps": sent.get("sent", 0) / max(sent.get("seconds", t1 - t0), 1e-3),
        "kernel_drops": drops1 - drops0,
        "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "probe_loss_pct": 100 * seen["lost"] / max(1.0, seen["lost"] + seen["probes"]),
        "forwarded_flood": seen["other"],
    }
    return Figures(seen["longest_gap_ms"] / 1000, counts)


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _row(path: str, kind: str, spoof: bool, rate: int, mine: Figures, ref: Figures) -> str:
    c, r = mine.counts, ref.counts
    flood = f"{kind}{' spoofed /16' if spoof else ''}"
    loss = f"{_fmt(c['down_loss_pct'], 1)} / {_fmt(c['up_loss_pct'], 1)}"
    reasons = ", ".join(
        f"{k.removeprefix('drop_')} {_fmt(v)}"
        for k, v in sorted(c.items())
        if k.startswith("drop_")
    )
    return (
        f"| {path} | {flood} | {'max' if rate == 0 else _fmt(rate)} "
        f"| {_fmt(c['offered_pps'])} | {_fmt(c['received_pps'])} | {_fmt(c['kernel_drops'])} "
        f"| {_fmt(mine.gap_s * 1000)} | {loss} "
        f"| {_fmt(c['relay_cpu_pct'])} | {_fmt(c['forwarded_c2t'] - c['call_packets_up'])} "
        f"/ {_fmt(c['flood_bindings'])} | {reasons} "
        f"| {_fmt(r['offered_pps'])} | {_fmt(r['cpu_pct'])} | {_fmt(r['kernel_drops'])} "
        f"| {_fmt(ref.gap_s * 1000)} ({_fmt(r['probe_loss_pct'], 1)} % lost) |"
    )


HEADER = (
    "| relay path | flood | rate asked | offered pps | relay received pps | kernel drops "
    "| call's longest gap ms | call loss % down / up | relay CPU % | forwarded beyond the "
    "call / flood bindings | relay drops by reason | ref: offered pps | ref CPU % "
    "| ref kernel drops | ref probe longest gap ms |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


async def measure(args: argparse.Namespace, tools: Tools) -> list[str]:
    workdir = Path(tempfile.mkdtemp(prefix="relay-flood-"))
    kinds = [
        (k, s) for s in (False, True) for k in args.kinds.split(",") if s or not args.spoof_only
    ]
    rates = [int(r) for r in args.rates.split(",")]
    lines: list[str] = []
    gaps_at_target: list[tuple[str, float]] = []
    with relay_faults.fault_edge(workdir, args.workers) as edge:
        quiet = await relay_faults.quiet(edge, args.flood_s)
        lines.append(f"quiet call (no flood, reference): longest gap {quiet.gap_s * 1000:.0f} ms")
        refs: dict[tuple[str, bool, int], Figures] = {}
        for kind, spoof in kinds:
            for rate in rates:
                refs[kind, spoof, rate] = await reference_row(
                    edge, tools, rate, args.flood_s, kind, spoof
                )
                print(
                    f"ref {kind} spoof={spoof} {rate}: {refs[kind, spoof, rate]}",
                    file=sys.stderr,
                    flush=True,
                )
        for path in args.paths.split(","):

            async def rows(path: str = path) -> Figures:
                for kind, spoof in kinds:
                    for rate in rates:
                        mine = await relay_faults.flood_generated(
                            edge, rate, args.flood_s, kind, spoof=spoof, floodgen=tools.floodgen
                        )
                        print(
                            f"{path} {kind} spoof={spoof} {rate}: {mine}",
                            file=sys.stderr,
                            flush=True,
                        )
                        lines.append(_row(path, kind, spoof, rate, mine, refs[kind, spoof, rate]))
                        if rate == TARGET_PPS or (
                            rate == 0 and mine.counts["offered_pps"] >= TARGET_PPS
                        ):
                            gaps_at_target.append(
                                (f"{path}/{kind}{'/spoofed' if spoof else ''}", mine.gap_s)
                            )
                return Figures()

            flags = ["--native-path", path, *args.relay_arg]
            await relay_faults.with_relay_flags(edge, flags, rows())
    print(
        f"\nflood {args.flood_s} s per row; relay workers {args.workers} "
        f"{' '.join(args.relay_arg)}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(lines[0])
    print()
    print(HEADER)
    for line in lines[1:]:
        print(line)
    worst = {
        p: max((g for name, g in gaps_at_target if name.startswith(p + "/")), default=float("nan"))
        for p in args.paths.split(",")
    }
    print()
    # The target is the native path's (the default); the last line says whether it is met.
    for path in sorted(worst, key=lambda p: p == "on"):
        gap_ms = worst[path] * 1000
        print(
            f"--native-path {path}: no gap over {TARGET_GAP_MS:.0f} ms at {TARGET_PPS // 1000}k "
            f"pps: {'MET' if gap_ms <= TARGET_GAP_MS else 'NOT MET'} (worst {gap_ms:.0f} ms)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="on,off", help="relay --native-path values, in order")
    parser.add_argument("--kinds", default="random,forged,dtls")
    parser.add_argument("--rates", default="20000,100000,0", help="pps; 0: as fast as possible")
    parser.add_argument("--spoof-only", action="store_true", help="only the spoofed-source rows")
    parser.add_argument("--flood-s", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        help="one more relay flag for every row, e.g. --relay-arg=--verifications-per-s=1000",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("relay_flood needs root (network namespaces)", file=sys.stderr)
        return 1
    tools = Tools(_binary("floodgen"), _binary("ref_forwarder"))
    net.sweep()
    asyncio.run(measure(args, tools))
    return 0


if __name__ == "__main__":
    sys.exit(main())
