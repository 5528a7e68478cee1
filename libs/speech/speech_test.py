"""Recognition, synthesis and word error rate, on real espeak-ng speech."""

from __future__ import annotations

import asyncio
import os
import subprocess

import numpy as np
import pytest

from libs.speech.recognition import RecognitionPool, recognise, resample
from libs.speech.synthesis import (
    INTELLIGIBILITY_SENTENCE,
    Speech,
    SynthesisError,
    parse_wav,
    synthesise,
    synthesise_async,
)
from libs.speech.wer import word_error_rate, words


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("the cat sat", "the cat sat", 0.0),
        ("The cat, sat!", "the cat sat", 0.0),  # case and punctuation do not count
        ("the cat sat", "the bat sat", 1 / 3),  # substitution
        ("the cat sat", "the sat", 1 / 3),  # deletion
        ("the cat sat", "the cat sat down", 1 / 3),  # insertion
        ("the cat sat", "", 1.0),
        ("a b", "c d e f", 2.0),  # more edits than words: above 1
        ("", "", 0.0),
        ("", "noise", 1.0),
        ("don't stop", "dont stop", 0.5),  # an apostrophe makes another word
    ],
)
def test_word_error_rate(reference: str, hypothesis: str, expected: float) -> None:
    assert word_error_rate(reference, hypothesis) == pytest.approx(expected)


def test_words_keep_apostrophes_inside() -> None:
    assert words("'Quoted' it's  fine.") == ["quoted", "it's", "fine"]


def test_resample_keeps_a_tone_and_drops_what_would_alias() -> None:
    rate = 24000
    t = np.arange(rate) / rate
    low = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    high = (8000 * np.sin(2 * np.pi * 11000 * t)).astype(np.int16)  # above 16 kHz's Nyquist
    assert len(resample(low, rate, 16000)) == 16000
    assert np.abs(resample(low, rate, 16000)).max() > 7000
    assert np.abs(resample(high, rate, 16000)[200:-200]).max() < 800


@pytest.mark.parametrize("rate_hz", [16000, 24000, 48000])
def test_the_intelligibility_sentence_comes_back(rate_hz: int) -> None:
    speech = synthesise(INTELLIGIBILITY_SENTENCE).at_rate(rate_hz)
    assert 2.0 < speech.seconds < 6.0
    heard = recognise(speech.pcm, rate_hz)
    assert word_error_rate(INTELLIGIBILITY_SENTENCE, heard) <= 0.2, heard


def test_silence_and_scraps_are_no_words() -> None:
    assert recognise(b"", 16000) == ""
    assert recognise(bytes(3), 16000) == ""  # under 100 ms, odd length
    assert recognise(bytes(32000), 16000) == ""  # a second of silence
    with pytest.raises(ValueError, match="rate_hz"):
        recognise(bytes(3200), 0)


def test_bad_voice_and_bad_wav_are_errors() -> None:
    with pytest.raises(SynthesisError):  # (not "no-such-voice": that is Norwegian)
        synthesise("hello", voice="nosuchvoice")
    with pytest.raises(SynthesisError):
        parse_wav(b"RIFF nonsense")


@pytest.mark.timeout(60)
def test_async_synthesis_and_a_cancelled_one_leaves_no_child() -> None:
    async def run() -> Speech:
        speech = await synthesise_async("you said hello")
        task = asyncio.create_task(synthesise_async("a long text " * 200))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return speech

    speech = asyncio.run(asyncio.wait_for(run(), 30))
    assert speech.rate_hz == 22050
    assert speech.seconds > 0.5
    children = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "espeak-ng"], capture_output=True, text=True, check=False
    )
    assert children.stdout.split() == []


@pytest.mark.timeout(120)
def test_pool_recognises_in_worker_processes() -> None:
    speech = synthesise(INTELLIGIBILITY_SENTENCE).at_rate(24000)

    async def run() -> tuple[str, str]:
        pool = RecognitionPool(workers=1)
        try:
            await pool.warm_up()
            return await asyncio.gather(
                pool.recognise(speech.pcm, 24000), pool.recognise(bytes(48000), 24000)
            )
        finally:
            await pool.close()

    heard, silence = asyncio.run(asyncio.wait_for(run(), 90))
    assert word_error_rate(INTELLIGIBILITY_SENTENCE, heard) <= 0.2, heard
    assert silence == ""


def test_scaled_speech_is_quieter_and_clips_when_louder() -> None:
    speech = Speech(np.array([1000, -20000], dtype="<i2").tobytes(), 16000)
    assert np.frombuffer(speech.scaled(0.5).pcm, "<i2").tolist() == [500, -10000]
    assert np.frombuffer(speech.scaled(2.0).pcm, "<i2").tolist() == [2000, -32768]
