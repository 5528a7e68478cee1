"""Turn detection: a pure state machine over per-frame voice activity decisions.

`TurnDetector.feed(is_speech, frame_ms)` returns the events that frame causes:

- `SpeechStarted(audio_start_ms)` once `speech_start_ms` of continuous speech has been seen
  (a lone voiced frame - a click, a cough - does not start a turn). The start is back-dated
  to the first voiced frame of the run.
- `SpeechStopped(audio_end_ms)` and `TurnComplete` once the caller has been silent for the
  end-of-turn silence. `audio_end_ms` is where the last speech frame's speech ended: its end,
  or, when the frame says how much of it was speech (`speech_ms`), that much into it.

The end-of-turn silence is adaptive: after an utterance shorter than `short_utterance_ms`
the detector waits `short_utterance_extra_silence_ms` longer. Short utterances ("So...",
"Well, I think") are often the start of a thought followed by a hesitation; a fixed timer
tuned for full sentences cuts those callers off. Long utterances keep the base silence so
answers to them stay snappy. Speech during the silence resumes the same turn.

`VoiceActivity` wraps webrtcvad: it needs 10/20/30 ms frames at 8/16/32/48 kHz, so other
rates (the transceiver's 24 kHz) are resampled to 16 kHz by linear interpolation
(see audio.py) and re-cut into 20 ms frames. webrtcvad keeps saying "speech" for ~100 ms
after speech ends (its hangover smoothing), which would put every turn's end that much late:
with an energy floor, a frame whose level is below it is silence whatever webrtcvad says,
and a speech frame's `speech_ms` ends at its last sample above the floor and within 30 dB
of the frame's peak (Opus' decoded tail rings ~12 ms longer at -50 dBFS), so the end of
speech is known to the millisecond (the per-turn latency the transceiver reports starts
there).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import webrtcvad

from libs.wire.realtime_session import turn_detection
from services.bridge.audio import FRAME_MS, Samples, resample_linear


@dataclasses.dataclass(frozen=True)
class TurnConfig:
    """Knobs of one detector, in milliseconds of audio."""

    speech_start_ms: int = 60
    end_of_turn_silence_ms: int = 700
    short_utterance_ms: int = 1000
    short_utterance_extra_silence_ms: int = 300

    def silence_needed_ms(self, utterance_ms: int) -> int:
        """End-of-turn silence after an utterance of `utterance_ms` (the adaptive rule)."""
        if utterance_ms < self.short_utterance_ms:
            return self.end_of_turn_silence_ms + self.short_utterance_extra_silence_ms
        return self.end_of_turn_silence_ms


def turn_config_for_session(base: TurnConfig, session_config: Mapping[str, Any]) -> TurnConfig:
    """Applies a session's OpenAI Realtime `turn_detection.silence_duration_ms` (GA shape
    `audio.input.turn_detection` or the older top-level `turn_detection`) over `base`.

    Missing, null or malformed values keep the base setting: a client typo must not end the
    session.
    """
    detection = turn_detection(session_config)
    if not isinstance(detection, Mapping):
        return base
    silence = detection.get("silence_duration_ms")
    if isinstance(silence, bool) or not isinstance(silence, int | float):
        return base
    if not 0 < silence <= 10000:
        return base
    return dataclasses.replace(base, end_of_turn_silence_ms=int(silence))


@dataclasses.dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int


@dataclasses.dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@dataclasses.dataclass(frozen=True)
class TurnComplete:
    audio_start_ms: int
    audio_end_ms: int


TurnEvent = SpeechStarted | SpeechStopped | TurnComplete


class TurnState(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"  # voiced frames seen, fewer than speech_start_ms
    SPEAKING = "speaking"
    PAUSED = "paused"  # in a turn, silent for less than the end-of-turn silence


class TurnDetector:
    """Per-session state machine; positions are milliseconds of audio fed so far."""

    def __init__(self, config: TurnConfig) -> None:
        self.config = config
        self.state = TurnState.IDLE
        self.position_ms = 0
        self._run_start_ms = 0  # first voiced frame of the current run or turn
        self._run_ms = 0  # voiced ms in STARTING
        self._silence_start_ms = 0
        self._silence_ms = 0
        self._speech_end_ms = 0  # where the last speech frame's speech ended

    def feed(
        self, is_speech: bool, frame_ms: int = FRAME_MS, speech_ms: int | None = None
    ) -> list[TurnEvent]:
        """One frame's decision; `speech_ms`: how far into a speech frame its speech went
        (None: all of it)."""
        events: list[TurnEvent] = []
        start = self.position_ms
        self.position_ms += frame_ms
        if is_speech:
            self._speech_end_ms = start + (frame_ms if speech_ms is None else speech_ms)
        if self.state is TurnState.IDLE and is_speech:
            self._run_start_ms = start
            self._run_ms = 0
            self.state = TurnState.STARTING
        if self.state is TurnState.STARTING:
            if not is_speech:
                self.state = TurnState.IDLE
                return events
            self._run_ms += frame_ms
            if self._run_ms >= self.config.speech_start_ms:
                self.state = TurnState.SPEAKING
                events.append(SpeechStarted(self._run_start_ms))
            return events
        if self.state is TurnState.SPEAKING:
            if not is_speech:
                self.state = TurnState.PAUSED
                self._silence_start_ms = start
                self._silence_ms = 0
            else:
                return events
        if self.state is TurnState.PAUSED:
            if is_speech:
                self.state = TurnState.SPEAKING
                return events
            self._silence_ms += frame_ms
            utterance_ms = self._silence_start_ms - self._run_start_ms
            if self._silence_ms >= self.config.silence_needed_ms(utterance_ms):
                self.state = TurnState.IDLE
                end = min(self._speech_end_ms, self._silence_start_ms)
                events.append(SpeechStopped(end))
                events.append(TurnComplete(self._run_start_ms, end))
        return events


VAD_RATES = (8000, 16000, 32000, 48000)
TAIL_DB = 30.0  # below a speech frame's peak by this much, its samples no longer count


@dataclasses.dataclass(frozen=True)
class VoiceFrame:
    """One 20 ms decision; `speech_ms`: where in the frame its last sample above the energy
    floor is (the frame's length without a floor)."""

    is_speech: bool
    speech_ms: int = FRAME_MS


def dbfs_amplitude(dbfs: float) -> float:
    """The s16 sample amplitude of a level in dB relative to full scale."""
    return float(32768.0 * 10.0 ** (dbfs / 20.0))


class VoiceActivity:
    """webrtcvad over arbitrary-rate mono chunks: one decision per 20 ms. With
    `energy_floor_dbfs`, frames whose RMS is below it are silence (webrtcvad's hangover over
    quiet audio), and speech frames say where their speech ended (`frames`)."""

    def __init__(
        self, aggressiveness: int, sample_rate_hz: int, energy_floor_dbfs: float | None = None
    ) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self._src_rate = sample_rate_hz
        self._rate = sample_rate_hz if sample_rate_hz in VAD_RATES else 16000
        self._frame = self._rate * FRAME_MS // 1000
        self._pending: Samples = np.zeros(0, dtype=np.int16)
        self._floor = None if energy_floor_dbfs is None else dbfs_amplitude(energy_floor_dbfs)

    def feed(self, samples: Samples) -> list[bool]:
        return [frame.is_speech for frame in self.frames(samples)]

    def frames(self, samples: Samples) -> list[VoiceFrame]:
        converted = resample_linear(samples, self._src_rate, self._rate)
        self._pending = np.concatenate([self._pending, converted])
        out: list[VoiceFrame] = []
        while len(self._pending) >= self._frame:
            chunk, self._pending = self._pending[: self._frame], self._pending[self._frame :]
            out.append(self._decide(chunk))
        return out

    def _decide(self, chunk: Samples) -> VoiceFrame:
        speech = bool(self._vad.is_speech(chunk.astype("<i2").tobytes(), self._rate))
        if self._floor is None or not speech:
            return VoiceFrame(speech)
        values = chunk.astype(np.float64)
        if float(np.sqrt(np.mean(values**2))) < self._floor:
            return VoiceFrame(False)
        # Where the frame's speech ends: its last sample above the floor and within TAIL_DB
        # of the frame's peak (a codec's or a room's ringing below that is not speech).
        magnitude = np.abs(values)
        threshold = max(self._floor, float(magnitude.max()) * 10.0 ** (-TAIL_DB / 20.0))
        loud = np.flatnonzero(magnitude >= threshold)
        last = int(loud[-1]) + 1 if len(loud) else len(chunk)
        return VoiceFrame(True, max(1, math.ceil(last * 1000 / self._rate)))
