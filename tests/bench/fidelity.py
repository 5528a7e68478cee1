"""What the bridge heard against what the caller said (pure): the audio fidelity benchmark's
metrics, on 16 kHz float samples.

- `assemble`: the bridge's PCM frames placed by `AudioFrame.sequence`, each 20 ms; a missing
  sequence number (a frame the transceiver never delivered) is 20 ms of silence.
- `align`: Chromium loops the reference, so the received stretch starts anywhere in the loop:
  the offset is the peak of the cross-correlation with one loop period (FFT).
- PESQ (ITU-T P.862.2 wideband, the `pesq` package) and STOI (`pystoi`) of the received
  stretch against the aligned reference.
- Broken frames (`frame_verdicts`): a 20 ms frame counts when the reference is speech there
  (its RMS within `ACTIVE_DB` of the loudest reference frame); it is broken when its
  waveform does not match the reference: the best normalised cross-correlation with the
  reference over lags within +-`SEARCH_MS` of the tracked alignment is below `MIN_CORR`,
  or its level differs from the reference's there by more than `MAX_LEVEL_DB`. A gap
  (silence) always is; a concealed frame is when the concealment did not reproduce the
  speech. Each frame matched with correlation >= `TRACK_CORR` moves the tracked lag to its
  own, so a receive path that changes its delay (a jitter buffer growing by a frame) is
  followed instead of counting everything after the change as broken.
- Delivery (`delivery`): frames per second at the bridge over the stretch and the longest
  interval between two frames (50 and 20 ms when paced exactly).

Extra columns (for example a word error rate) go in `QUALITY_METRICS`: one `Metric` each,
computed from the `Stretch` like PESQ and STOI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pesq import pesq  # type: ignore[import-untyped]
from pystoi import stoi  # type: ignore[import-untyped]

RATE = 16000
FRAME_MS = 20
ACTIVE_DB = 30.0
SEARCH_MS = 25
MIN_CORR = 0.5
TRACK_CORR = 0.8
MAX_LEVEL_DB = 10.0
ALIGN_MARGIN_MS = 200  # how far the tracked lag may wander from the global alignment


def frame_samples(rate: int = RATE) -> int:
    return rate * FRAME_MS // 1000


def assemble(frames: Mapping[int, bytes], first: int, count: int) -> tuple[np.ndarray, int]:
    """PCM s16le frames by sequence number, `first` to `first + count - 1`, as float samples
    (missing ones silence, at the size of the others); also how many were missing."""
    present = [frames[s] for s in range(first, first + count) if s in frames]
    if not present:
        raise ValueError(f"no frame between sequence {first} and {first + count - 1}")
    size = len(present[0]) // 2
    silence = bytes(2 * size)
    pcm = b"".join(frames.get(s, silence) for s in range(first, first + count))
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
    return samples, count - len(present)


@dataclass(frozen=True)
class Alignment:
    """The looped reference around the stretch the received samples match: `margin`
    samples of it before and after."""

    reference: np.ndarray
    margin: int

    def matched(self) -> np.ndarray:
        return self.reference[self.margin : len(self.reference) - self.margin]


def align(reference: np.ndarray, received: np.ndarray, margin: int = 0) -> Alignment:
    """Where in the looped `reference` (one loop period) `received` starts: the lag of the
    largest cross-correlation, over one period."""
    period, length = len(reference), len(received)
    if period == 0 or length == 0:
        raise ValueError("empty reference or received audio")
    reps = math.ceil((length + 2 * margin) / period) + 2
    tiled = np.tile(reference, reps)
    base = period * math.ceil(margin / period)
    segment = tiled[base : base + period + length - 1]
    size = 1 << (len(segment) - 1).bit_length()
    spectrum = np.fft.rfft(segment, size) * np.conj(np.fft.rfft(received, size))
    correlation = np.fft.irfft(spectrum, size)[:period]
    start = base + int(np.argmax(correlation))
    return Alignment(tiled[start - margin : start + length + margin], margin)


@dataclass(frozen=True)
class FrameVerdicts:
    active: int  # frames where the reference is speech
    broken: int  # of those, the ones whose waveform does not match

    @property
    def broken_pct(self) -> float:
        return 100.0 * self.broken / self.active if self.active else 0.0


def _best_match(window: np.ndarray, frame: np.ndarray) -> tuple[int, float, float]:
    """(index, normalised correlation, frame energy / reference energy in dB) of the slice
    of `window` that matches `frame` best."""
    size = len(frame)
    products = np.correlate(window, frame, mode="valid")
    squares = np.concatenate([[0.0], np.cumsum(window**2)])
    energies = squares[size:] - squares[:-size]
    own = float(np.dot(frame, frame))
    if own <= 0.0:
        return 0, 0.0, -math.inf
    # Cauchy-Schwarz keeps this within [-1, 1]; the floor (40 dB under the frame) keeps a
    # silent stretch of reference from dividing by nothing.
    ncc = products / np.sqrt(np.maximum(energies, own * 1e-4) * own)
    best = int(np.argmax(ncc))
    level_db = 10.0 * math.log10(own / max(float(energies[best]), 1e-20))
    return best, float(ncc[best]), level_db


def frame_verdicts(alignment: Alignment, received: np.ndarray, rate: int = RATE) -> FrameVerdicts:
    """Counts the active and the broken 20 ms frames of `received` (see the module's text)."""
    size = frame_samples(rate)
    search = rate * SEARCH_MS // 1000
    reach = max(0, alignment.margin - search)
    reference = alignment.reference
    matched = alignment.matched()
    loudest = max(
        (float(np.sqrt(np.mean(matched[i : i + size] ** 2))) for i in range(0, len(matched), size)),
        default=0.0,
    )
    active_floor = loudest * 10 ** (-ACTIVE_DB / 20)
    track = 0
    active = broken = 0
    for k in range(len(received) // size):
        frame = received[k * size : (k + 1) * size]
        at = alignment.margin + k * size + track
        expected = reference[at : at + size]
        if len(expected) < size or float(np.sqrt(np.mean(expected**2))) < active_floor:
            continue
        active += 1
        window = reference[at - search : at + search + size]
        index, correlation, level_db = _best_match(window, frame)
        if correlation < MIN_CORR or abs(level_db) > MAX_LEVEL_DB:
            broken += 1
        elif correlation >= TRACK_CORR:
            track = max(-reach, min(reach, track + index - search))
    return FrameVerdicts(active, broken)


@dataclass(frozen=True)
class Stretch:
    """The measured stretch: what the bridge received and the reference it should be."""

    reference: np.ndarray  # aligned, the same length as `received`
    received: np.ndarray
    rate: int = RATE


@dataclass(frozen=True)
class Metric:
    """One quality column of the table."""

    name: str
    compute: Callable[[Stretch], float]
    fmt: str = "{:.2f}"


def pesq_wideband(stretch: Stretch) -> float:
    try:
        return float(pesq(stretch.rate, stretch.reference, stretch.received, "wb"))
    except Exception:  # the library's NoUtterancesError and friends: no score, not a crash
        return math.nan


def stoi_score(stretch: Stretch) -> float:
    return float(stoi(stretch.reference, stretch.received, stretch.rate, extended=False))


QUALITY_METRICS: tuple[Metric, ...] = (
    Metric("PESQ", pesq_wideband),
    Metric("STOI", stoi_score, "{:.3f}"),
)


@dataclass(frozen=True)
class Delivery:
    frames_per_s: float
    max_interval_ms: float


def delivery(arrivals: Sequence[float]) -> Delivery:
    """Frames per second over the arrival times (monotonic seconds) and the longest wait."""
    if len(arrivals) < 2:
        return Delivery(math.nan, math.nan)
    times = np.sort(np.asarray(arrivals, dtype=np.float64))
    span = float(times[-1] - times[0])
    rate = (len(times) - 1) / span if span > 0 else math.inf
    return Delivery(rate, 1000.0 * float(np.max(np.diff(times))))
