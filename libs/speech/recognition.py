"""Offline speech recognition with PocketSphinx (`pocketsphinx` on PyPI: its wheel carries
the US English acoustic model, dictionary and language model, so nothing is downloaded).

`recognise(pcm, rate_hz)` decodes one whole utterance of mono s16le PCM and returns the
words it heard ("" for none). The model works on 16 kHz audio: other rates are resampled,
with a low-pass first when going down (aliased energy above 8 kHz confuses the acoustic
model noticeably more than it bothers a VAD). Each process keeps one decoder (loading the
model takes about a second and 100 MB); a decoder is not thread-safe, so calls in one
process are serialised.

PocketSphinx holds the GIL for the whole decode (about 0.3 s of CPU per second of speech),
which would stall an event loop's other work in a thread; `RecognitionPool` runs decodes
in worker processes instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import threading
from typing import Any, cast

import numpy as np
import numpy.typing as npt

MODEL_RATE_HZ = 16000
# Half-width of the windowed-sinc low-pass, in taps of the source rate.
_LOWPASS_HALF_TAPS = 48
# Less audio than this is no speech.
MIN_AUDIO_MS = 100
# Nor is audio quieter than this RMS (about -60 dBFS): on digital silence the decoder, its
# feature normalisation primed by earlier speech, can "hear" a word.
MIN_RMS = 32.0

_decoder: Any = None
_decoder_lock = threading.Lock()


def resample(samples: npt.NDArray[np.int16], src_rate: int, dst_rate: int) -> npt.NDArray[np.int16]:
    """Resamples a whole utterance: low-pass below the new Nyquist when decimating, then
    linear interpolation."""
    if src_rate == dst_rate or len(samples) == 0:
        return samples
    signal = samples.astype(np.float64)
    if dst_rate < src_rate:
        cutoff = 0.45 * dst_rate / src_rate  # cycles per source sample, a little under Nyquist
        taps = np.arange(-_LOWPASS_HALF_TAPS, _LOWPASS_HALF_TAPS + 1)
        kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))
        signal = np.convolve(signal, kernel / kernel.sum(), mode="same")
    count = round(len(signal) * dst_rate / src_rate)
    positions = np.arange(count) * (src_rate / dst_rate)
    out = np.interp(positions, np.arange(len(signal)), signal)
    return cast(npt.NDArray[np.int16], np.clip(np.round(out), -32768, 32767).astype(np.int16))


def load_model() -> None:
    """Loads this process's decoder (the first `recognise` does it otherwise)."""
    global _decoder
    with _decoder_lock:
        if _decoder is None:
            from pocketsphinx import Decoder  # a second to import and load: only when used

            _decoder = Decoder(samprate=MODEL_RATE_HZ, loglevel="FATAL")


def recognise(pcm: bytes, rate_hz: int) -> str:
    """The words PocketSphinx hears in one utterance of mono s16le `pcm` at `rate_hz`
    (lower case, separated by single spaces; "" if none, under `MIN_AUDIO_MS` or quieter
    than `MIN_RMS`)."""
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2")
    if len(samples) * 1000 < MIN_AUDIO_MS * rate_hz:
        return ""
    if np.sqrt(np.mean(samples.astype(np.float64) ** 2)) < MIN_RMS:
        return ""
    audio = resample(samples.astype(np.int16), rate_hz, MODEL_RATE_HZ).astype("<i2").tobytes()
    load_model()
    with _decoder_lock:
        _decoder.start_utt()
        _decoder.process_raw(audio, full_utt=True)
        _decoder.end_utt()
        hypothesis = _decoder.hyp()
    return " ".join(hypothesis.hypstr.split()) if hypothesis is not None else ""


def _ready() -> bool:
    return _decoder is not None


class RecognitionPool:
    """`recognise` in `workers` processes of their own (spawned, never forked: the parent
    runs gRPC threads), each with its model loaded at start. `close()` is idempotent."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=load_model,
        )

    async def warm_up(self) -> None:
        """Until the workers are up with their model loaded (a broken install fails here)."""
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(self._executor, _ready) for _ in range(self.workers)]
        await asyncio.gather(*calls)

    async def recognise(self, pcm: bytes, rate_hz: int) -> str:
        """`recognise` in a worker. Cancelling the await abandons the result; the worker
        finishes that decode first."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, recognise, pcm, rate_hz)

    async def close(self) -> None:
        """Drops queued decodes and waits for the workers to exit (idempotent)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
