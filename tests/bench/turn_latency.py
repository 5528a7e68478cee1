"""Per-turn latency (issue 19): what the transceiver reports for each turn against what the
caller measures, at several think times of the echo agent. Prints figures, asserts nothing;
recorded in BENCHMARKS.md.

    ./bazelw run //tests/bench:turn_latency                       # 20 turns at 0/200/500 ms
    ./bazelw run //tests/bench:turn_latency -- --turns 5 --think-ms 0,500

One call per think time (tests/e2e/turn_call.py): an aiortc caller through the real
transceiver (in-process, real gRPC and UDP mux, the test kit's framing relay) to the real
bridge's echo agent, which waits `echo_think_ms` before each answer. The reference is the
caller's own measurement in the same run: from the moment its last tone packet of a turn
left to the first echoed packet with audio energy that arrives. Beside it, per turn, the
transceiver's reported voice-to-voice (turn_timing.py) and its three parts, and the
difference reported - measured (the issue's check: within +-20 ms); the call record's own
p50/p95 last, as the operator sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from services.transceiver.call_quality import percentile
from tests.e2e.turn_call import TurnCallResult, run_turn_call

DEFAULT_THINK_MS = "0,200,500"
TOLERANCE_MS = 20.0
TURN_S = 3.0  # tone and silence of one turn (turn_call.py), for the call's timeout
CALL_MARGIN_S = 60.0  # set-up, the lead silence, the last records; a loaded machine


@dataclass(frozen=True)
class TurnFigures:
    """One turn, milliseconds: the caller's measurement and the transceiver's report."""

    measured_ms: float
    reported_ms: float
    end_of_turn_ms: float
    bridge_ms: float
    playout_ms: float

    @property
    def difference_ms(self) -> float:
        return self.reported_ms - self.measured_ms


@dataclass(frozen=True)
class ThinkSummary:
    think_ms: int
    turns: list[TurnFigures]  # both ends measured
    unmatched: int  # turns one of the two ends has no figure for
    record_p50_ms: float | None
    record_p95_ms: float | None

    def within_tolerance(self) -> int:
        return sum(1 for t in self.turns if abs(t.difference_ms) <= TOLERANCE_MS)


def pair_turns(result: TurnCallResult) -> tuple[list[TurnFigures], int]:
    """Turns with a figure at both ends, the caller's k-th with the transceiver's turn k
    (its `index` counts every end of speech the bridge detected, so a turn it abandoned or
    could not match leaves a hole, not a shift); how many turns were left unpaired."""
    by_index = {turn.index: turn for turn in result.reported}
    figures: list[TurnFigures] = []
    for index, measured in enumerate(result.measured_s, start=1):
        turn = by_index.get(index)
        if measured is None or turn is None:
            continue
        figures.append(
            TurnFigures(
                measured_ms=1000.0 * measured,
                reported_ms=1000.0 * turn.voice_to_voice_s,
                end_of_turn_ms=1000.0 * turn.end_of_turn_s,
                bridge_ms=1000.0 * turn.bridge_s,
                playout_ms=1000.0 * turn.playout_s,
            )
        )
    return figures, len(result.measured_s) - len(figures)


def summarise(think_ms: int, result: TurnCallResult) -> ThinkSummary:
    turns, unmatched = pair_turns(result)
    record = result.record
    return ThinkSummary(
        think_ms,
        turns,
        unmatched,
        None if record is None else record.voice_to_voice_p50_ms,
        None if record is None else record.voice_to_voice_p95_ms,
    )


COLUMNS: tuple[tuple[str, str], ...] = (
    ("measured_ms", "caller measured"),
    ("reported_ms", "reported total"),
    ("end_of_turn_ms", "end of turn"),
    ("bridge_ms", "bridge"),
    ("playout_ms", "playout"),
    ("difference_ms", "reported - measured"),
)


def _p50_p95(values: list[float]) -> str:
    p50, p95 = percentile(values, 0.50), percentile(values, 0.95)
    if p50 is None or p95 is None:
        return "-"
    return f"{p50:.1f} / {p95:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(summaries: Sequence[ThinkSummary]) -> str:
    """A Markdown table: per think time, p50 / p95 (ms) of every figure."""
    header = ["think ms", "turns", *(label for _, label in COLUMNS), "worst diff, within 20 ms"]
    header.append("call record p50 / p95")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [str(s.think_ms), f"{len(s.turns)} (+{s.unmatched} unpaired)"]
        cells += [_p50_p95([getattr(t, key) for t in s.turns]) for key, _ in COLUMNS]
        worst = max((t.difference_ms for t in s.turns), key=abs, default=None)
        cells.append(f"{_ms(worst)}, {s.within_tolerance()} of {len(s.turns)}")
        cells.append(f"{_ms(s.record_p50_ms)} / {_ms(s.record_p95_ms)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst_line(summaries: Sequence[ThinkSummary]) -> str:
    differences = [t.difference_ms for s in summaries for t in s.turns]
    if not differences:
        return "no turn measured at both ends"
    worst = max(differences, key=abs)
    inside = sum(s.within_tolerance() for s in summaries)
    return (
        f"reported - measured: worst {worst:+.1f} ms; {inside} of {len(differences)} turns "
        f"within +-{TOLERANCE_MS:.0f} ms (target: all)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20, help="turns per think time")
    parser.add_argument(
        "--think-ms",
        default=DEFAULT_THINK_MS,
        help=f"echo think times (default {DEFAULT_THINK_MS})",
    )
    args = parser.parse_args(argv)
    if args.turns < 1:
        parser.error("--turns: at least 1")
    try:
        args.think_ms = [int(t) for t in args.think_ms.split(",") if t.strip()]
    except ValueError:
        parser.error("--think-ms: comma-separated integers")
    if not args.think_ms or min(args.think_ms) < 0 or max(args.think_ms) > 1000:
        # Beyond ~1 s the echo would still play when the caller's next turn starts.
        parser.error("--think-ms: between 0 and 1000")
    return args


async def run(args: argparse.Namespace) -> list[ThinkSummary]:
    summaries = []
    for think_ms in args.think_ms:
        timeout_s = CALL_MARGIN_S + TURN_S * args.turns
        result = await run_turn_call(think_ms, turns=args.turns, timeout_s=timeout_s)
        summary = summarise(think_ms, result)
        print(
            f"think {think_ms} ms: {len(summary.turns)} turns paired, {summary.unmatched} not",
            file=sys.stderr,
            flush=True,
        )
        summaries.append(summary)
    return summaries


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"per-turn latency: {args.turns} turns per think time; {machine_load()}", flush=True)
    summaries = asyncio.run(run(args))
    print(format_table(summaries))
    print(worst_line(summaries))
    print(f"after the run: {machine_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
