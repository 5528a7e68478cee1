"""The audio fidelity benchmark reduced to one clean call on today's receive path: the
whole edge on the netsim layout, Chromium speaking the espeak-ng reference, the capturing
bridge scoring it. Sanity bounds only (the figures are the benchmark's, BENCHMARKS.md): a
clean link gives PESQ above 3.5, every frame delivered, no broken frame to speak of."""

from __future__ import annotations

from pathlib import Path

from tests.bench import audio_fidelity


def test_a_clean_link_scores_as_clean(tmp_path: Path) -> None:
    args = audio_fidelity.parse_args(
        [
            "--conditions",
            "clean",
            "--paths",
            "direct",
            "--seconds",
            "4",
            "--warmup-s",
            "1",
            "--calls",
            "1",
        ]
    )
    (row,) = audio_fidelity.run(args, tmp_path)
    print(audio_fidelity.format_table([row]))
    assert row.quality["PESQ"] > 3.5, row
    assert row.quality["STOI"] > 0.9, row
    assert row.missing == 0, row
    assert row.broken_pct < 2.0, row
    assert 45.0 < row.delivery.frames_per_s < 55.0, row
