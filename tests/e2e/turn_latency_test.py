"""Per-turn latency end to end: an aiortc caller through the real transceiver and the real
bridge's echo agent (turn_call.py). What the transceiver reports for each turn matches, to
±20 ms, what the caller measures from its own end of speech to the first echoed audio
energy it receives, with the agent answering at once and after a 200 ms think time; the
call ends in one call record with its turns."""

from __future__ import annotations

import pytest

from tests.e2e.turn_call import run_turn_call

TOLERANCE_S = 0.020
TURNS = 3


@pytest.mark.timeout_s(90)
@pytest.mark.parametrize("think_ms", [0, 200])
async def test_reported_voice_to_voice_matches_the_caller(think_ms: int) -> None:
    result = await run_turn_call(think_ms, turns=TURNS)
    measured = result.measured_s
    reported = [turn.voice_to_voice_s for turn in result.reported]
    assert len(measured) == TURNS
    assert len(reported) == TURNS, (measured, reported)
    for by_caller, by_transceiver in zip(measured, reported, strict=True):
        assert by_caller is not None
        assert abs(by_transceiver - by_caller) <= TOLERANCE_S, (measured, reported)
    for turn in result.reported:
        # The think time is in the bridge's part, and only there.
        assert turn.bridge_s >= think_ms / 1000.0 - 0.001
        assert turn.end_of_turn_s >= 0.4  # the echo agent's end-of-turn silence
        assert turn.playout_s >= 0.0
    record = result.record
    assert record is not None
    assert record.close_reason == "CLOSE_REASON_CLIENT_HANGUP"
    assert record.turns == TURNS
    assert record.voice_to_voice_p50_ms is not None
    assert record.voice_to_voice_p95_ms is not None
    assert record.voice_to_voice_p50_ms <= record.voice_to_voice_p95_ms
    assert 4.0 < record.mos <= 4.5  # loopback: no loss, next to no delay
