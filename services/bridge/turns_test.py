"""TurnDetector tables over synthetic speech/silence sequences, the per-session override,
the VAD front end on synthetic signals, and the PCM helpers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.bridge.audio import pcm_to_mono, resample_linear, split_frames
from services.bridge.turns import (
    SpeechStarted,
    SpeechStopped,
    TurnComplete,
    TurnConfig,
    TurnDetector,
    TurnEvent,
    VoiceActivity,
    turn_config_for_session,
)

BASE = TurnConfig(
    speech_start_ms=60,
    end_of_turn_silence_ms=200,
    short_utterance_ms=500,
    short_utterance_extra_silence_ms=100,
)


def pattern(text: str) -> list[bool]:
    """'S' = 20 ms voiced, '.' = 20 ms silent; spaces are ignored."""
    return [c == "S" for c in text if c != " "]


def run(config: TurnConfig, frames: list[bool]) -> list[tuple[int, TurnEvent]]:
    detector = TurnDetector(config)
    out: list[tuple[int, TurnEvent]] = []
    for index, voiced in enumerate(frames):
        out.extend((index, event) for event in detector.feed(voiced, 20))
    return out


LONG = "S" * 30  # 600 ms: not a short utterance with BASE

CASES: list[tuple[str, TurnConfig, str, list[tuple[int, TurnEvent]]]] = [
    ("silence only", BASE, "." * 50, []),
    ("two voiced frames are a click, not speech", BASE, "SS" + "." * 30, []),
    (
        "three voiced frames start a turn, back-dated to the first",
        BASE,
        ".." + LONG + "." * 10,
        [(4, SpeechStarted(40)), (41, SpeechStopped(640)), (41, TurnComplete(40, 640))],
    ),
    (
        "interrupted start run restarts the count",
        BASE,
        "SS.SSS" + "S" * 27 + "." * 10,
        [(5, SpeechStarted(60)), (42, SpeechStopped(660)), (42, TurnComplete(60, 660))],
    ),
    (
        "a pause shorter than the end-of-turn silence keeps one turn",
        BASE,
        LONG + "." * 9 + "SSS" + "." * 10,
        [(2, SpeechStarted(0)), (51, SpeechStopped(840)), (51, TurnComplete(0, 840))],
    ),
    (
        "turn still open at the end: no stop event",
        BASE,
        LONG + "." * 9,
        [(2, SpeechStarted(0))],
    ),
    (
        "short utterance waits the extra silence (200 + 100 ms)",
        BASE,
        "S" * 10 + "." * 20,
        [(2, SpeechStarted(0)), (24, SpeechStopped(200)), (24, TurnComplete(0, 200))],
    ),
    (
        "extension off: short utterance ends after the base silence",
        TurnConfig(60, 200, 500, 0),
        "S" * 10 + "." * 20,
        [(2, SpeechStarted(0)), (19, SpeechStopped(200)), (19, TurnComplete(0, 200))],
    ),
    (
        "two turns in a row",
        BASE,
        LONG + "." * 10 + LONG + "." * 10,
        [
            (2, SpeechStarted(0)),
            (39, SpeechStopped(600)),
            (39, TurnComplete(0, 600)),
            (42, SpeechStarted(800)),
            (79, SpeechStopped(1400)),
            (79, TurnComplete(800, 1400)),
        ],
    ),
    (
        "long silence setting: 1 s pause does not end the turn",
        TurnConfig(60, 1200, 0, 0),
        LONG + "." * 50 + LONG + "." * 60,
        [(2, SpeechStarted(0)), (169, SpeechStopped(2200)), (169, TurnComplete(0, 2200))],
    ),
]


@pytest.mark.parametrize(
    ("config", "frames", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_turn_detector_table(
    config: TurnConfig, frames: str, expected: list[tuple[int, TurnEvent]]
) -> None:
    assert run(config, pattern(frames)) == expected


def test_positions_follow_frame_durations() -> None:
    detector = TurnDetector(TurnConfig(60, 100, 0, 0))
    events = [e for voiced in [True] * 2 + [False] * 4 for e in detector.feed(voiced, 30)]
    assert events == [SpeechStarted(0), SpeechStopped(60), TurnComplete(0, 60)]
    assert detector.position_ms == 180


SESSION_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("empty", {}, 200),
    ("beta shape", {"turn_detection": {"silence_duration_ms": 900}}, 900),
    ("GA shape", {"audio": {"input": {"turn_detection": {"silence_duration_ms": 1500.0}}}}, 1500),
    ("null turn detection", {"turn_detection": None}, 200),
    ("string value", {"turn_detection": {"silence_duration_ms": "900"}}, 200),
    ("boolean value", {"turn_detection": {"silence_duration_ms": True}}, 200),
    ("out of range", {"turn_detection": {"silence_duration_ms": 0}}, 200),
    ("too long", {"turn_detection": {"silence_duration_ms": 60000}}, 200),
    ("audio not a dict", {"audio": "x", "turn_detection": {"silence_duration_ms": 300}}, 300),
]


@pytest.mark.parametrize(
    ("config", "expected"), [c[1:] for c in SESSION_CASES], ids=[c[0] for c in SESSION_CASES]
)
def test_session_override(config: dict[str, Any], expected: int) -> None:
    assert turn_config_for_session(BASE, config).end_of_turn_silence_ms == expected


def tone(freq_hz: float, seconds: float, rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * freq_hz * t)).astype(np.int16)


@pytest.mark.parametrize("rate", [24000, 16000, 48000, 44100])
def test_vad_hears_a_tone_and_not_silence(rate: int) -> None:
    vad = VoiceActivity(2, rate)
    frame = rate // 50
    signal = np.concatenate([tone(440, 1.0, rate), np.zeros(rate, dtype=np.int16)])
    decisions = [d for i in range(0, len(signal), frame) for d in vad.feed(signal[i : i + frame])]
    assert len(decisions) == 100
    assert sum(decisions[:50]) >= 48
    assert sum(decisions[60:]) == 0


def test_vad_rechunks_odd_sizes() -> None:
    vad = VoiceActivity(2, 24000)
    signal = tone(440, 0.5)
    decisions = [d for i in range(0, len(signal), 333) for d in vad.feed(signal[i : i + 333])]
    assert len(decisions) == 25  # 12000 samples -> about 8000 at 16 kHz -> 25 frames of 320


def test_resample_lengths_and_values() -> None:
    ramp = np.arange(480, dtype=np.int16)
    out = resample_linear(ramp, 24000, 16000)
    assert len(out) == 320
    assert out[1] == 2  # position 1.5 -> 1.5, rounded to even
    assert list(resample_linear(ramp, 24000, 24000)) == list(ramp)
    assert len(resample_linear(np.zeros(0, dtype=np.int16), 24000, 16000)) == 0


def test_mono_downmix_and_partial_bytes() -> None:
    stereo = np.array([100, 300, -100, -300], dtype="<i2").tobytes() + b"\x01"
    assert list(pcm_to_mono(stereo, 2)) == [200, -200]
    assert list(pcm_to_mono(b"\x01\x00\x02", 1)) == [1]


def test_split_frames() -> None:
    frames, rest = split_frames(b"abcdefg", 3)
    assert frames == [b"abc", b"def"]
    assert rest == b"g"


def test_the_energy_floor_cuts_webrtcvads_hangover_and_ends_speech_to_the_ms() -> None:
    rate = 24000
    burst = tone(440, 1.013, rate)  # ends 13 ms into a 20 ms frame
    signal = np.concatenate(
        [np.zeros(rate // 2, dtype=np.int16), burst, np.zeros(rate, dtype=np.int16)]
    )
    ends = {}
    for floor in (None, -50.0):
        vad = VoiceActivity(2, rate, floor)
        detector = TurnDetector(TurnConfig(end_of_turn_silence_ms=400))
        events = [
            event
            for i in range(0, len(signal), 480)
            for voice in vad.frames(signal[i : i + 480])
            for event in detector.feed(voice.is_speech, speech_ms=voice.speech_ms)
        ]
        (stopped,) = [e for e in events if isinstance(e, SpeechStopped)]
        ends[floor] = stopped.audio_end_ms
    assert ends[-50.0] == 1513  # 500 ms of silence, then the 1013 ms tone
    assert ends[None] >= 1580  # webrtcvad alone hangs over by ~100 ms


def test_speech_ms_moves_the_end_within_the_last_speech_frame() -> None:
    config = TurnConfig(speech_start_ms=20, end_of_turn_silence_ms=40, short_utterance_ms=0)
    detector = TurnDetector(config)
    assert detector.feed(True) == [SpeechStarted(0)]
    assert detector.feed(True, speech_ms=7) == []
    assert detector.feed(False) == []
    assert detector.feed(False) == [SpeechStopped(27), TurnComplete(0, 27)]
