"""The speech reference of the audio fidelity benchmark: a few sentences spoken by espeak-ng
(Debian `espeak-ng`, installed by ./bazelw) at run time, written as the 48 kHz mono WAV
Chromium loops as its microphone, and kept as 16 kHz samples for PESQ wideband and STOI.

The sentences are our own; the voice, rate and level are fixed, so every run sends the same
reference (espeak-ng is deterministic for a given version). Where each sentence lies in the
pass (`Sentence`) is found from espeak-ng's pauses: about 300 ms between sentences, under
60 ms inside one; the word error rate column recognises the received audio sentence by
sentence against these texts.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr  # type: ignore[import-untyped]

from libs.speech import wer

ESPEAK = "espeak-ng"
BROWSER_RATE = 48000  # what Chromium's fake capture plays (tests/e2e/browser.py WAV_RATE)
METRIC_RATE = 16000  # PESQ wideband's rate
SENTENCES = (
    "A quiet river runs past the old mill every morning. "
    "Seven green boxes were stacked beside the kitchen door. "
    "Please call the station before the last train leaves at nine."
)
WORDS_PER_MINUTE = 175
LEVEL_DBFS = -20.0  # RMS of the active speech: a plain talker into a microphone, no clipping
TRAILING_SILENCE_S = 0.5  # between two passes of the loop
# Sentence spans: 10 ms blocks quieter than the loudest by this much are silence, and this
# much silence in a row ends a sentence (espeak-ng: ~300 ms between sentences, <= 60 ms
# inside one at this rate).
SILENCE_DB = 40.0
SENTENCE_PAUSE_MS = 200
BLOCK_MS = 10


@dataclass(frozen=True)
class Sentence:
    """One sentence of the pass: its text and where it is spoken, in samples at the
    metrics' rate (end exclusive)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class SpeechReference:
    """One pass of the loop Chromium plays, at the browser's rate and at the metrics' rate."""

    wav_path: Path  # 48 kHz mono s16le, Chromium's microphone
    samples_16k: np.ndarray  # float64 in [-1, 1], the same pass
    sentences: tuple[Sentence, ...] = ()  # in the order spoken

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every word spoken, once each (normalised as the word error rate compares them)."""
        return tuple(sorted({w for s in self.sentences for w in wer.words(s.text)}))

    @property
    def seconds(self) -> float:
        return len(self.samples_16k) / METRIC_RATE


def read_wav(source: Path | bytes) -> tuple[np.ndarray, int]:
    """Mono s16le WAV (a file, or its bytes) as float64 in [-1, 1] and its rate; ValueError
    for anything else. A streamed WAV (espeak-ng --stdout: no length) is read to its end."""
    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with wave.open(opened, "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(f"want mono 16-bit WAV, got {wav.getnchannels()} ch")
        rate = wav.getframerate()
        data = wav.readframes(wav.getnframes())
    pcm = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")
    return pcm.astype(np.float64) / 32768.0, rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())


def resample(samples: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    if from_hz == to_hz:
        return samples
    return np.asarray(soxr.resample(samples, from_hz, to_hz, quality="HQ"), dtype=np.float64)


def _at_level(samples: np.ndarray, dbfs: float) -> np.ndarray:
    active = samples[np.abs(samples) > 10 ** (-50 / 20)]
    rms = float(np.sqrt(np.mean(active**2))) if active.size else 0.0
    if rms == 0.0:
        raise ValueError("espeak-ng produced silence")
    scaled = samples * (10 ** (dbfs / 20) / rms)
    peak = float(np.max(np.abs(scaled)))
    return scaled * (0.9 / peak) if peak > 0.9 else scaled


def split_sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part]


def speech_spans(samples: np.ndarray, rate: int) -> list[tuple[int, int]]:
    """The stretches of `samples` between pauses of at least SENTENCE_PAUSE_MS, as
    (start, end) sample indices; leading and trailing silence left out."""
    block = rate * BLOCK_MS // 1000
    count = len(samples) // block
    if count == 0:
        return []
    levels = np.sqrt(np.mean(samples[: count * block].reshape(count, block) ** 2, axis=1))
    loud = levels > levels.max() * 10 ** (-SILENCE_DB / 20)
    spans: list[tuple[int, int]] = []
    quiet_run = SENTENCE_PAUSE_MS // BLOCK_MS  # as if a pause came before the first block
    for index, is_loud in enumerate(loud):
        if not is_loud:
            quiet_run += 1
            continue
        if quiet_run >= SENTENCE_PAUSE_MS // BLOCK_MS:
            spans.append((index * block, (index + 1) * block))
        else:
            spans[-1] = (spans[-1][0], (index + 1) * block)
        quiet_run = 0
    return spans


def locate_sentences(samples: np.ndarray, rate: int, text: str) -> tuple[Sentence, ...]:
    """Each sentence of `text` with its span in `samples`; ValueError when the pauses do not
    split the audio into as many stretches as there are sentences."""
    texts = split_sentences(text)
    spans = speech_spans(samples, rate)
    if len(spans) != len(texts):
        raise ValueError(f"{len(texts)} sentences but {len(spans)} stretches of speech")
    return tuple(Sentence(t, a, b) for t, (a, b) in zip(texts, spans, strict=True))


def synthesise(workdir: Path, text: str = SENTENCES) -> SpeechReference:
    """Speaks `text` with espeak-ng into workdir/speech.wav (48 kHz, levelled, a short
    silence appended so the loop's passes are apart); RuntimeError if espeak-ng is missing."""
    if shutil.which(ESPEAK) is None:
        raise RuntimeError(f"{ESPEAK} missing: ./bazelw installs the Debian package espeak-ng")
    # To stdout: espeak-ng cuts long -w paths (Bazel's sandbox has them) without a word.
    spoken_wav = subprocess.run(
        [ESPEAK, "-v", "en-us", "-s", str(WORDS_PER_MINUTE), "--stdout", text],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    spoken, rate = read_wav(spoken_wav)
    browser = _at_level(resample(spoken, rate, BROWSER_RATE), LEVEL_DBFS)
    browser = np.concatenate([browser, np.zeros(int(TRAILING_SILENCE_S * BROWSER_RATE))])
    wav_path = workdir / "speech.wav"
    write_wav(wav_path, browser, BROWSER_RATE)
    # What Chromium reads back (s16 rounding included), taken to the metrics' rate.
    played, _ = read_wav(wav_path)
    samples = resample(played, BROWSER_RATE, METRIC_RATE)
    return SpeechReference(wav_path, samples, locate_sentences(samples, METRIC_RATE, text))
