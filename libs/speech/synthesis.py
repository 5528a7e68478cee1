"""Speech synthesis with espeak-ng (Debian `espeak-ng`, which ./bazelw installs), run as a
subprocess that writes a WAV to stdout; the text goes in on stdin, so no text can be taken
for an option.

`synthesise(text)` blocks (tests, benchmarks); `synthesise_async(text)` runs the same
subprocess under asyncio (the event loop never waits on it) and kills it when cancelled.
Both return `Speech`: mono s16le PCM and its rate (espeak-ng's own, 22050 Hz).

`INTELLIGIBILITY_SENTENCE` in `TEST_VOICE` at `TEST_WORDS_PER_MINUTE` is one PocketSphinx
recognises word for word here, also after 48 -> 24 -> 16 kHz resampling; most sentences in
espeak-ng's default male voice come back garbled.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np

from libs.speech.recognition import resample

ESPEAK = "espeak-ng"
TEST_VOICE = "en-us+f3"
TEST_WORDS_PER_MINUTE = 130
INTELLIGIBILITY_SENTENCE = "i would like to speak to someone about my account"
# espeak-ng speaks a few hundred characters in well under a second; past this it is stuck.
TIMEOUT_S = 20.0


class SynthesisError(Exception):
    """espeak-ng is missing, refused the voice, or produced no audio."""


@dataclass(frozen=True)
class Speech:
    pcm: bytes  # mono s16le
    rate_hz: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.rate_hz

    def scaled(self, gain: float) -> Speech:
        """The same speech, `gain` times as loud (clipped to 16 bits)."""
        samples = np.frombuffer(self.pcm, dtype="<i2").astype(np.float64) * gain
        return Speech(np.clip(samples, -32768, 32767).astype("<i2").tobytes(), self.rate_hz)

    def at_rate(self, rate_hz: int) -> Speech:
        """The same speech resampled to `rate_hz`."""
        samples = np.frombuffer(self.pcm, dtype="<i2").astype(np.int16)
        return Speech(resample(samples, self.rate_hz, rate_hz).astype("<i2").tobytes(), rate_hz)


def espeak_command(voice: str, words_per_minute: int) -> list[str]:
    """espeak-ng reading stdin, WAV on stdout."""
    return [ESPEAK, "--stdin", "--stdout", "-v", voice, "-s", str(words_per_minute)]


def parse_wav(data: bytes) -> Speech:
    """espeak-ng's WAV (to a pipe its header cannot say the length: read to the end)."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getsampwidth() != 2:
                raise SynthesisError(f"expected 16-bit samples, got {wav.getsampwidth() * 8}")
            rate, channels = wav.getframerate(), wav.getnchannels()
            pcm = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise SynthesisError(f"not a WAV from {ESPEAK}: {exc}") from exc
    pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
    if channels > 1:
        frames = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels).astype(np.int32)
        pcm = frames.mean(axis=1).astype("<i2").tobytes()
    if not pcm:
        raise SynthesisError(f"{ESPEAK} produced no audio")
    return Speech(pcm, rate)


def _check(returncode: int | None, stderr: bytes) -> None:
    if returncode != 0:
        said = stderr.decode(errors="replace").strip()
        raise SynthesisError(f"{ESPEAK} exited with {returncode}: {said}")


def available() -> bool:
    return shutil.which(ESPEAK) is not None


def synthesise(
    text: str, voice: str = TEST_VOICE, words_per_minute: int = TEST_WORDS_PER_MINUTE
) -> Speech:
    """`text` spoken by espeak-ng (blocking)."""
    try:
        done = subprocess.run(
            espeak_command(voice, words_per_minute),
            input=text.encode(),
            capture_output=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise SynthesisError(f"{ESPEAK} is not installed (Debian package espeak-ng)") from exc
    _check(done.returncode, done.stderr)
    return parse_wav(done.stdout)


async def synthesise_async(
    text: str, voice: str = TEST_VOICE, words_per_minute: int = TEST_WORDS_PER_MINUTE
) -> Speech:
    """`text` spoken by espeak-ng in a subprocess the event loop does not wait on; a
    cancelled call kills it."""
    try:
        process = await asyncio.create_subprocess_exec(
            *espeak_command(voice, words_per_minute),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise SynthesisError(f"{ESPEAK} is not installed (Debian package espeak-ng)") from exc
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(text.encode()), TIMEOUT_S)
    except BaseException as exc:  # cancelled or stuck: the child is ours, end it
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(exc, TimeoutError):
            raise SynthesisError(f"{ESPEAK} took over {TIMEOUT_S} s") from exc
        raise
    _check(process.returncode, stderr)
    return parse_wav(stdout)


def write_wav(path: str, speech: Speech) -> None:
    """`speech` as a mono 16-bit WAV file (e.g. Chromium's fake microphone)."""
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(speech.rate_hz)
        wav.writeframes(speech.pcm)
