"""The per-turn latency benchmark still measures: its pairing on made-up turns (a turn the
transceiver abandoned leaves a hole, not a shift), and the program run for two turns of one
real call, printing its table. Figures are the benchmark's (BENCHMARKS.md), not asserted."""

from __future__ import annotations

import pytest

from services.transceiver.turn_timing import TurnLatency
from tests.bench import turn_latency
from tests.e2e.turn_call import TurnCallResult


def _turn(index: int, speech_end_at: float) -> TurnLatency:
    return TurnLatency(
        index=index,
        audio_end_ms=1000 * index,
        speech_end_at=speech_end_at,
        stopped_at=speech_end_at + 0.45,
        first_audio_at=speech_end_at + 0.65,
        played_at=speech_end_at + 0.67,
    )


def test_turns_pair_by_index_and_summarise() -> None:
    # Turn 2 was abandoned by the transceiver; the caller heard nothing for turn 4.
    result = TurnCallResult(
        measured_s=[0.675, 0.70, 0.660, None],
        reported=[_turn(1, 10.0), _turn(3, 20.0), _turn(4, 30.0)],
        record=None,
    )
    summary = turn_latency.summarise(200, result)
    assert summary.unmatched == 2
    assert [round(t.difference_ms, 1) for t in summary.turns] == [-5.0, 10.0]
    assert [round(t.bridge_ms, 1) for t in summary.turns] == [200.0, 200.0]
    assert summary.within_tolerance() == 2
    table = turn_latency.format_table([summary])
    assert "| 200 | 2 (+2 unpaired) |" in table, table
    assert "| 10.0, 2 of 2 |" in table, table
    assert "worst +10.0 ms" in turn_latency.worst_line([summary])


@pytest.mark.timeout_s(120)
async def test_two_turns_of_a_real_call(capsys: pytest.CaptureFixture[str]) -> None:
    args = turn_latency.parse_args(["--turns", "2", "--think-ms", "0"])
    (summary,) = await turn_latency.run(args)
    print(turn_latency.format_table([summary]))
    assert summary.turns, capsys.readouterr()
    assert summary.record_p50_ms is not None
