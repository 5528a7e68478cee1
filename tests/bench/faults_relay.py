"""Relay faults, measured: each scenario of tests/netsim/relay_faults.py run N times with a
live call on the netsim standard layout; prints RELIABILITY.md's `## Relay` table
(scenario, promise, min/median/max of the caller's longest audio gap, what was counted).

    ./bazelw run //tests/bench:faults_relay                      # every scenario, 3 runs
    ./bazelw run //tests/bench:faults_relay -- --runs 1 --only flood_mixed,quiet

Needs root (network namespaces). The flood's "limits off" rows restart the relay with
the per-IP and verification budgets out of reach (what the relay did before them), in
the same run, as the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.netsim import relay_faults
from tests.netsim.relay_faults import Figures
from tools.netsim import net
from tools.netsim.edge import NetEdge

COMMAND = "./bazelw run //tests/bench:faults_relay"
NO_LIMITS = ["--unbound-pps-per-ip", "1000000000", "--verifications-per-s", "1000000000"]


@dataclass(frozen=True)
class Scenario:
    name: str
    promise: str
    run: Callable[[NetEdge, argparse.Namespace], Awaitable[Figures]]


def _flood(mode: str, limits: bool) -> Callable[[NetEdge, argparse.Namespace], Awaitable[Figures]]:
    def run(edge: NetEdge, args: argparse.Namespace) -> Awaitable[Figures]:
        body = relay_faults.flood(edge, args.flood_pps, args.flood_s, mode)
        return body if limits else relay_faults.with_relay_flags(edge, NO_LIMITS, body)

    return run


SCENARIOS = [
    Scenario("quiet", "reference: no fault", lambda e, a: relay_faults.quiet(e, 5.0)),
    Scenario(
        "geosteer_restart",
        "geosteer kill -9 + restart: no gap, 0 UNKNOWN_SOURCE drops",
        lambda e, a: relay_faults.geosteer_restart(e),
    ),
    Scenario(
        "relay_restart_geosteer_down",
        "relay kill -9 + restart while geosteer is down: call forwarded from the persisted "
        "topology and Redis bindings; gap = the new process starting",
        lambda e, a: relay_faults.relay_restart_while_geosteer_down(e),
    ),
    Scenario(
        "relay_kill_restart_redis",
        "relay kill -9 + restart, Redis: gap = the new process starting",
        lambda e, a: relay_faults.relay_kill_restart(e, redis=True),
    ),
    Scenario(
        "relay_kill_restart_memory",
        "relay kill -9 + restart, memory only: bindings recalled from the transceiver, "
        "gap = the new process starting",
        lambda e, a: relay_faults.relay_kill_restart(e, redis=False),
    ),
    Scenario(
        "relay_kill_restart_memory_no_recall",
        "reference: the same with --recall-bindings=false (until the client's next STUN check)",
        lambda e, a: relay_faults.relay_kill_restart(e, redis=False, recall=False),
    ),
    Scenario(
        "relay_replacement",
        "new relay binds beside the old (SO_REUSEPORT), old SIGTERM: gap <= 200 ms",
        lambda e, a: relay_faults.relay_replacement(e),
    ),
    Scenario(
        "relay_replacement_memory",
        "the same, memory only: the new process recalls the bindings from the transceiver",
        lambda e, a: relay_faults.relay_replacement(e, redis=False),
    ),
    Scenario(
        "worker_crash",
        "one worker kill -9: replaced; degraded until then; call carries on",
        lambda e, a: relay_faults.worker_crash(e),
    ),
    Scenario(
        "replay_64_ports",
        "captured check replayed from 64 ports x10: 0 bindings, 0 bytes reflected",
        lambda e, a: relay_faults.replay_from_many_ports(e),
    ),
    Scenario(
        "flood_random", "random bytes at --flood-pps: call unaffected", _flood("random", True)
    ),
    Scenario(
        "flood_forged",
        "forged MESSAGE-INTEGRITY with the call's USERNAME at --flood-pps: call unaffected",
        _flood("forged", True),
    ),
    Scenario(
        "flood_keys", "requests with other (forged) ufrags at --flood-pps", _flood("keys", True)
    ),
    Scenario(
        "flood_random_limits_off",
        "reference: random bytes, per-IP and verification budgets off",
        _flood("random", False),
    ),
    Scenario(
        "flood_forged_limits_off",
        "reference: forged MACs, per-IP and verification budgets off",
        _flood("forged", False),
    ),
]


def _spread(values: Sequence[float], scale: float = 1.0, digits: int = 0) -> str:
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return " / ".join(f"{v * scale:.{digits}f}" for v in (low, mid, high))


def _counts(runs: Sequence[Figures]) -> str:
    keys = sorted({k for f in runs for k in f.counts})
    parts = []
    for key in keys:
        values = [f.counts[key] for f in runs if key in f.counts]
        parts.append(f"{key} {_spread(values, digits=2 if key.endswith('_s') else 0)}")
    return "; ".join(parts)


Rows = list[tuple[Scenario, list[Figures]]]


async def measure(args: argparse.Namespace) -> Rows:
    """Each chosen scenario `args.runs` times on one standard edge; progress on stderr."""
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="faults-relay-"))
    rows: Rows = []
    with relay_faults.fault_edge(workdir, args.workers) as edge:
        for scenario in chosen:
            runs: list[Figures] = []
            for index in range(args.runs):
                figures = await scenario.run(edge, args)
                runs.append(figures)
                print(
                    f"{scenario.name} run {index + 1}: gap {figures.gap_s * 1000:.0f} ms "
                    f"{figures.counts}",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append((scenario, runs))
    return rows


def print_table(rows: Rows, args: argparse.Namespace) -> None:
    print(f"\nflood: {args.flood_pps} pps for {args.flood_s} s; relay workers: {args.workers}")
    print(
        "\n| scenario | promise | longest audio gap ms (min / median / max) | counted "
        "(min / median / max) | command |"
    )
    print("|---|---|---|---|---|")
    for scenario, runs in rows:
        gaps = [f.gap_s for f in runs]
        print(
            f"| {scenario.name} | {scenario.promise} | {_spread(gaps, 1000)} | "
            f"{_counts(runs)} | `{COMMAND} -- --only {scenario.name}` |"
        )


async def run(args: argparse.Namespace) -> None:
    print_table(await measure(args), args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of this program (the soak program takes them too)."""
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--flood-pps", type=int, default=20_000)
    parser.add_argument("--flood-s", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--list", action="store_true", help="print the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name}: {scenario.promise}")
        return 0
    if os.geteuid() != 0:
        print("faults_relay needs root (network namespaces)", file=sys.stderr)
        return 1
    net.sweep()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
