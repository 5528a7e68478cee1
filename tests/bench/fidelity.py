"""What the bridge heard against what the caller said (pure): the audio fidelity benchmark's
metrics, on 16 kHz float samples.

- `assemble`: the bridge's PCM frames placed by `AudioFrame.sequence`, each 20 ms; a missing
  sequence number (a frame the transceiver never delivered) is 20 ms of silence.
- `align`: Chromium loops the reference, so the received stretch starts anywhere in the loop:
  the offset is the peak of the cross-correlation with one loop period (FFT).
- PESQ (ITU-T P.862.2 wideband, the `pesq` package) and STOI (`pystoi`) of the received
  stretch against the aligned reference.
- Broken frames (`frame_verdicts`): a 20 ms frame counts when the reference is speech there
  (its RMS within `ACTIVE_DB` of the loudest reference frame). It is broken when it does
  not sound like the reference: its level differs from the reference's by more than
  `MAX_LEVEL_DB` (a gap, silence, always does), or it matches neither the waveform (best
  normalised cross-correlation within +-`FINE_SEARCH_MS` below `MIN_CORR`) nor the
  spectral envelope (`envelope_distance_db` above `MAX_ENVELOPE_DB`: Opus codes noise-like
  sounds by their envelope, not their waveform). A concealed or FEC-recovered frame passes
  when it reproduced the speech well enough. The alignment follows a receive path that
  changes its delay (a jitter buffer growing by a frame): after `TRACK_FRAMES` frames in a
  row that fail at the current lag but match (>= `TRACK_CORR`) at one other lag within
  +-`SEARCH_MS`, that lag is the alignment from then on.
- Delivery (`delivery`): frames per second at the bridge over the stretch and the longest
  interval between two frames (50 and 20 ms when paced exactly).

- Word error rate (`word_error_rate`): each reference sentence spoken wholly inside the
  stretch (`sentences_in`, from where the alignment puts the stretch in the loop), cut out
  of the received audio with `SENTENCE_PAD_MS` either side and recognised with PocketSphinx
  (the listen agent's recogniser, its US English acoustic model) against the sentence's
  text: the edits of all of them over their words. No whole sentence in the stretch: no
  figure. The decoder is held to the reference's own words (`VocabularyDecoder`): with its
  full language model PocketSphinx hears espeak-ng's voice of these sentences as mostly
  other words (WER 0.9 on the clean reference itself), which would leave nothing for the
  receive path to change; held to them, 0.30 (the benchmark prints this floor). About
  0.15 s of CPU per second of speech, after the call.

Extra columns go in `QUALITY_METRICS`: one `Metric` each, computed from the `Stretch` like
PESQ, STOI and WER.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pesq import pesq  # type: ignore[import-untyped]
from pystoi import stoi  # type: ignore[import-untyped]

from libs.speech import wer
from tests.bench.speech import Sentence

RATE = 16000
FRAME_MS = 20
ACTIVE_DB = 30.0
FINE_SEARCH_MS = 1
SEARCH_MS = 25
MIN_CORR = 0.5
MAX_LEVEL_DB = 10.0
# On the clean link no frame's envelope is more than 6.1 dB off (Opus keeps the spectral
# shape of what it does not code as a waveform, such as fricatives).
MAX_ENVELOPE_DB = 7.0
TRACK_CORR = 0.9
TRACK_FRAMES = 3
# Band edges of the envelope comparison, Hz (the last band ends at half the rate).
BAND_EDGES_HZ = (0, 300, 600, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000)
ALIGN_MARGIN_MS = 200  # how far the tracked lag may wander from the global alignment
# Audio kept either side of a sentence for recognition: half espeak-ng's pause between
# sentences, room for a jitter buffer's changing delay, none of the next sentence.
SENTENCE_PAD_MS = 150
DITHER_SEED = 19  # the recogniser's dither: the same audio gives the same words every run


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
    offset: int = 0  # where in one loop period the matched stretch starts

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
    return Alignment(tiled[start - margin : start + length + margin], margin, start % period)


def sentences_in(
    sentences: Sequence[Sentence], period: int, offset: int, length: int, rate: int = RATE
) -> tuple[Sentence, ...]:
    """The loop's sentences (spans in one period) spoken wholly inside a stretch of `length`
    samples that starts at loop position `offset`, in order, their spans relative to the
    stretch and widened by SENTENCE_PAD_MS (as far as the stretch reaches)."""
    pad = rate * SENTENCE_PAD_MS // 1000
    found: list[Sentence] = []
    for loop in range(-1, length // max(period, 1) + 2):
        for sentence in sentences:
            start = sentence.start + loop * period - offset
            end = sentence.end + loop * period - offset
            if start >= 0 and end <= length:
                found.append(Sentence(sentence.text, max(0, start - pad), min(length, end + pad)))
    return tuple(sorted(found, key=lambda s: s.start))


@dataclass(frozen=True)
class FrameVerdicts:
    active: int  # frames where the reference is speech
    broken: int  # of those, the ones that do not sound like it

    @property
    def broken_pct(self) -> float:
        return 100.0 * self.broken / self.active if self.active else 0.0


def _correlations(window: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlation of `frame` with every slice of `window`, and the
    slices' energies."""
    size = len(frame)
    products = np.correlate(window, frame, mode="valid")
    squares = np.concatenate([[0.0], np.cumsum(window**2)])
    energies = np.maximum(squares[size:] - squares[:-size], 0.0)
    own = float(np.dot(frame, frame))
    # Cauchy-Schwarz keeps this within [-1, 1]; the floor (40 dB under the frame) keeps a
    # silent stretch of reference from dividing by nothing.
    ncc = products / np.sqrt(np.maximum(energies, own * 1e-4) * own) if own > 0 else products * 0
    return ncc, energies


def _band_energies(frame: np.ndarray, rate: int) -> np.ndarray:
    power = np.abs(np.fft.rfft(frame * np.hanning(len(frame)))) ** 2
    freqs = np.fft.rfftfreq(len(frame), 1.0 / rate)
    edges = [*BAND_EDGES_HZ, rate / 2 + 1]
    return np.array([power[(freqs >= a) & (freqs < b)].sum() for a, b in itertools.pairwise(edges)])


def envelope_distance_db(frame: np.ndarray, expected: np.ndarray, rate: int = RATE) -> float:
    """How far the spectral shape of `frame` is from `expected`'s: the RMS over the bands
    (those within 40 dB of `expected`'s strongest) of their level differences in dB, the
    mean difference (the overall level) taken out."""
    got = _band_energies(frame, rate) + 1e-20
    want = _band_energies(expected, rate) + 1e-20
    keep = want > want.max() * 1e-4
    differences = 10.0 * np.log10(got[keep] / want[keep])
    return float(np.sqrt(np.mean((differences - differences.mean()) ** 2)))


def frame_verdicts(alignment: Alignment, received: np.ndarray, rate: int = RATE) -> FrameVerdicts:
    """Counts the active and the broken 20 ms frames of `received` (see the module's text)."""
    size = frame_samples(rate)
    search = rate * SEARCH_MS // 1000
    fine = rate * FINE_SEARCH_MS // 1000
    reach = max(0, alignment.margin - search)
    reference = alignment.reference
    matched = alignment.matched()
    loudest = max(
        (float(np.sqrt(np.mean(matched[i : i + size] ** 2))) for i in range(0, len(matched), size)),
        default=0.0,
    )
    active_floor = loudest * 10 ** (-ACTIVE_DB / 20)
    track, candidate, streak = 0, 0, 0
    active = broken = 0
    for k in range(len(received) // size):
        frame = received[k * size : (k + 1) * size]
        at = alignment.margin + k * size + track
        expected = reference[at : at + size]
        if len(expected) < size or float(np.sqrt(np.mean(expected**2))) < active_floor:
            continue
        active += 1
        window = reference[at - search : at + search + size]
        ncc, energies = _correlations(window, frame)
        near = search - fine + int(np.argmax(ncc[search - fine : search + fine + 1]))
        own = float(np.dot(frame, frame))
        level_db = 10.0 * math.log10(max(own, 1e-20) / max(float(energies[near]), 1e-20))
        correlation = float(ncc[near])
        if abs(level_db) > MAX_LEVEL_DB or (
            correlation < MIN_CORR
            and envelope_distance_db(frame, window[near : near + size], rate) > MAX_ENVELOPE_DB
        ):
            broken += 1
        # A delay change: frames that match well elsewhere, at one new lag, 3 times running.
        best = int(np.argmax(ncc))
        if correlation < MIN_CORR and ncc[best] >= TRACK_CORR:
            lag = track + best - search
            streak = streak + 1 if abs(lag - candidate) <= 2 else 1
            candidate = lag
            if streak >= TRACK_FRAMES:
                track, streak = max(-reach, min(reach, candidate)), 0
        else:
            streak = 0
    return FrameVerdicts(active, broken)


@dataclass(frozen=True)
class Stretch:
    """The measured stretch: what the bridge received and the reference it should be."""

    reference: np.ndarray  # aligned, the same length as `received`
    received: np.ndarray
    rate: int = RATE
    sentences: tuple[Sentence, ...] = ()  # spoken wholly inside, spans in `received`
    vocabulary: tuple[str, ...] = ()  # every word of the reference (default: the sentences')


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


class VocabularyDecoder:
    """PocketSphinx at 16 kHz whose search is any sequence of `vocabulary`'s words (a JSGF
    word loop), dithered: digital silence (a gap, the pauses) otherwise throws its feature
    normalisation (the clean reference: WER about 0.5 without, 0.3 with). One per vocabulary
    and process: loading the model takes about a second."""

    _made: dict[tuple[str, ...], VocabularyDecoder] = {}

    def __init__(self, vocabulary: tuple[str, ...]) -> None:
        from pocketsphinx import Decoder  # a second to import and load: only when used

        self._decoder = Decoder(samprate=RATE, loglevel="FATAL", dither=True, seed=DITHER_SEED)
        unknown = [w for w in vocabulary if self._decoder.lookup_word(w) is None]
        if unknown:
            raise ValueError(f"words not in PocketSphinx's dictionary: {unknown}")
        loop = " | ".join(vocabulary)
        self._decoder.add_jsgf_string(
            "words", f"#JSGF V1.0;\ngrammar words;\npublic <s> = ( {loop} )* ;\n"
        )
        self._decoder.activate_search("words")

    @classmethod
    def of(cls, vocabulary: tuple[str, ...]) -> VocabularyDecoder:
        key = tuple(sorted(set(vocabulary)))
        if key not in cls._made:
            cls._made[key] = cls(key)
        return cls._made[key]

    def words(self, samples: np.ndarray) -> list[str]:
        pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()
        # Every utterance from the same start: the dither's generator and the cepstral mean
        # (carried over from the last utterance otherwise), so the same audio gives the
        # same words whatever came before it.
        self._decoder.reinit_feat()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        return wer.words(hypothesis.hypstr) if hypothesis is not None else []


def word_error_rate(stretch: Stretch) -> float:
    """Edits over words of the sentences in the stretch, recognised one by one; NaN when
    none is whole in it."""
    if stretch.rate != RATE:
        raise ValueError(f"recognition wants {RATE} Hz, got {stretch.rate}")
    vocabulary = stretch.vocabulary or tuple(
        w for sentence in stretch.sentences for w in wer.words(sentence.text)
    )
    edits = total = 0
    for sentence in stretch.sentences:
        heard = VocabularyDecoder.of(vocabulary).words(
            stretch.received[sentence.start : sentence.end]
        )
        said = wer.words(sentence.text)
        edits += wer.edit_distance(said, heard)
        total += len(said)
    return edits / total if total else math.nan


QUALITY_METRICS: tuple[Metric, ...] = (
    Metric("PESQ", pesq_wideband),
    Metric("STOI", stoi_score, "{:.3f}"),
    Metric("WER", word_error_rate),
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
