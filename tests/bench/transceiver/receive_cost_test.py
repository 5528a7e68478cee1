"""The receive-path cost benchmark still runs: both paths deliver every frame of a short
tone, and its table prints (the figures are the benchmark's, BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from tests.bench.transceiver import receive_cost, saturation


@pytest.mark.parametrize("mode", receive_cost.MODES)
@pytest.mark.parametrize("path", receive_cost.PATHS)
def test_every_frame_is_delivered(path: str, mode: str) -> None:
    packets = saturation.tone_packets(10)
    cost = receive_cost.measure(path, mode, packets, frames=300, repeats=1)
    # The adaptive path holds its first frames for the jitter buffer's delay.
    assert cost.delivered >= 300 - 5, cost
    assert cost.us_per_frame > 0


def test_the_program_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert receive_cost.main(["--frames", "200", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| transcoding |" in out, out
    assert "| passthrough |" in out, out
