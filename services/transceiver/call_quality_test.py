"""The E-model score as tables: loss, delay and jitter against R and MOS."""

from __future__ import annotations

import pytest

from services.transceiver.call_quality import (
    OPUS,
    CodecImpairment,
    call_quality,
    delay_impairment,
    effective_equipment_impairment,
    mos_from_r,
    mouth_to_ear_ms,
    percentile,
)

# (loss ratio, R, MOS) at 5 ms jitter and a 40 ms round trip (Ta = 56.5 ms: no delay term).
LOSS_TABLE = [
    (0.0, 93.2, 4.41),
    (0.01, 89.56, 4.33),
    (0.02, 86.19, 4.23),
    (0.05, 77.42, 3.92),
    (0.10, 66.13, 3.41),
    (0.20, 51.07, 2.63),
    (1.0, 93.2 - 95.0 * 100 / 125.1, 1.18),
]


@pytest.mark.parametrize(("loss", "r_factor", "mos"), LOSS_TABLE)
def test_the_score_at_each_loss(loss: float, r_factor: float, mos: float) -> None:
    quality = call_quality(loss, jitter_ms=5.0, rtt_ms=40.0)
    assert quality.mouth_to_ear_ms == pytest.approx(56.5)
    assert quality.r_factor == pytest.approx(r_factor, abs=0.01)
    assert quality.mos == pytest.approx(mos, abs=0.01)


def test_the_score_falls_as_loss_rises() -> None:
    scores = [call_quality(loss, 5.0, 40.0).mos for loss, _, _ in LOSS_TABLE]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)


@pytest.mark.parametrize(
    ("ta_ms", "idd"),
    [(0.0, 0.0), (100.0, 0.0), (150.0, 0.16), (200.0, 3.04), (400.0, 24.07)],
)
def test_delay_impairment(ta_ms: float, idd: float) -> None:
    assert delay_impairment(ta_ms) == pytest.approx(idd, abs=0.01)


def test_delay_and_jitter_lower_the_score() -> None:
    assert mouth_to_ear_ms(rtt_ms=100.0, jitter_ms=10.0) == pytest.approx(96.5)
    near = call_quality(0.0, jitter_ms=1.0, rtt_ms=20.0)
    far = call_quality(0.0, jitter_ms=1.0, rtt_ms=400.0)
    jittery = call_quality(0.0, jitter_ms=80.0, rtt_ms=20.0)
    assert near.r_factor == pytest.approx(93.2)
    assert far.mos < near.mos
    assert jittery.mos < near.mos


@pytest.mark.parametrize(
    ("codec", "loss", "ie_eff"),
    [
        (OPUS, 0.0, 0.0),
        (OPUS, 0.05, 95 * 5 / 30.1),
        (CodecImpairment(ie=11.0, bpl=19.0), 0.0, 11.0),  # G.729A-like
        (CodecImpairment(ie=11.0, bpl=19.0), 0.05, 11 + 84 * 5 / 24),
        (OPUS, -0.5, 0.0),  # out-of-range input is clamped, not an error
        (OPUS, 2.0, 95 * 100 / 125.1),
    ],
)
def test_effective_equipment_impairment(codec: CodecImpairment, loss: float, ie_eff: float) -> None:
    assert effective_equipment_impairment(loss, codec) == pytest.approx(ie_eff)


@pytest.mark.parametrize(
    ("r", "mos"), [(-5.0, 1.0), (0.0, 1.0), (50.0, 2.58), (93.2, 4.41), (120.0, 4.5)]
)
def test_mos_from_r(r: float, mos: float) -> None:
    assert mos_from_r(r) == pytest.approx(mos, abs=0.01)


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([float(v) for v in range(101)], 0.95) == pytest.approx(95.0)
