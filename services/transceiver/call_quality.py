"""A call's quality score: the ITU-T G.107 E-model's transmission rating R, simplified, and
the MOS estimate G.107 maps it to. Pure.

    R   = 93.2 - Idd(Ta) - Ie_eff
    Ie_eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)                      (G.107 §7.7)
    Idd = 0 for Ta <= 100 ms, else 25 * ((1 + X^6)^(1/6) - 3 (1 + (X/3)^6)^(1/6) + 2),
          X = log2(Ta / 100 ms)                                               (G.107 §7.4)
    MOS = 1 for R < 0, 4.5 for R > 100, else 1 + 0.035 R + R (R - 60)(100 - R) 7e-6
                                                                              (G.107 Annex B)

Simplifications: 93.2 is R with every other G.107 parameter at its default (no noise,
sidetone or echo impairments: the echo terms Idte and Idle are left out), BurstR = 1
(losses taken as random: RTCP gives no burst figures), and the one-way mouth-to-ear delay
Ta is estimated from what the transceiver measures:

    Ta = RTT / 2 (first hop: transceiver, relay, caller) + 2 x jitter (the depth an adaptive
         jitter buffer settles at) + 26.5 ms (Opus' algorithmic delay with 20 ms frames,
         RFC 6716)

The voice-to-voice latency of a turn (the agent's think time, TTS) is not Ta: it is waiting
for an answer, not delay on the line, and is reported beside the score, not in it.

Codec values: ITU-T G.113 Appendix I tabulates Ie and Bpl for ITU codecs, not for Opus.
`OPUS` uses provisional values on the narrowband scale: Ie = 0 (48 kbit/s Opus codes speech
at least as cleanly as G.711, whose Ie is 0) and Bpl = 25.1, the figure G.113 gives G.711
with its packet loss concealment (Opus conceals at least as well, and in-band FEC rebuilds
some lost frames outright, which the caller-side loss figure fed here already excludes).
Replace them in one place when measured ones exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

R_DEFAULT = 93.2  # R with every G.107 parameter at its default value
OPUS_ALGORITHMIC_DELAY_MS = 26.5  # 20 ms frame + 6.5 ms look-ahead (RFC 6716)


@dataclass(frozen=True)
class CodecImpairment:
    """G.107's codec parameters: equipment impairment and packet-loss robustness."""

    ie: float
    bpl: float


OPUS = CodecImpairment(ie=0.0, bpl=25.1)


@dataclass(frozen=True)
class Quality:
    r_factor: float
    mos: float
    mouth_to_ear_ms: float


def mouth_to_ear_ms(rtt_ms: float, jitter_ms: float) -> float:
    """The one-way delay estimate Ta (see the module docstring)."""
    return max(0.0, rtt_ms) / 2 + 2 * max(0.0, jitter_ms) + OPUS_ALGORITHMIC_DELAY_MS


def delay_impairment(ta_ms: float) -> float:
    """G.107's Idd: nothing up to 100 ms one way, then growing with log2 of the delay."""
    if ta_ms <= 100.0:
        return 0.0
    x = math.log2(ta_ms / 100.0)
    root6 = 1.0 / 6.0
    return 25.0 * (math.pow(1 + x**6, root6) - 3 * math.pow(1 + (x / 3) ** 6, root6) + 2)


def effective_equipment_impairment(
    loss_ratio: float, codec: CodecImpairment = OPUS, burst_ratio: float = 1.0
) -> float:
    """G.107's Ie,eff: the codec's impairment grown by packet loss (`loss_ratio` 0..1)."""
    ppl = min(1.0, max(0.0, loss_ratio)) * 100.0
    return codec.ie + (95.0 - codec.ie) * ppl / (ppl / burst_ratio + codec.bpl)


def mos_from_r(r: float) -> float:
    """G.107 Annex B: R to the estimated mean opinion score, 1 to 4.5."""
    if r < 0:
        return 1.0
    if r > 100:
        return 4.5
    return 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6


def call_quality(
    loss_ratio: float, jitter_ms: float, rtt_ms: float, codec: CodecImpairment = OPUS
) -> Quality:
    """The score of a call that met `loss_ratio` (0..1) of loss, `jitter_ms` interarrival
    jitter and `rtt_ms` round trip on its first hop."""
    ta = mouth_to_ear_ms(rtt_ms, jitter_ms)
    r = R_DEFAULT - delay_impairment(ta) - effective_equipment_impairment(loss_ratio, codec)
    return Quality(r_factor=r, mos=mos_from_r(r), mouth_to_ear_ms=ta)


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` (0..1) percentile by linear interpolation between the closest ranks;
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * min(1.0, max(0.0, fraction))
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
