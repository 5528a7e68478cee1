"""The echo backend: a turn-taking agent that plays each caller utterance back.

Per session: webrtcvad decisions feed a TurnDetector (turns.py); its events go to the
transceiver as SpeechStarted / SpeechStopped (which it turns into data-channel JSON). On turn
complete the agent answers with ResponseStarted, the utterance (from `prefix_padding_ms`
before the speech start to the speech end) as paced 20 ms frames, and ResponseDone.

Barge-in: speech starting while a response is queued or still playing at the transceiver
cancels it at once: ClearAudio, then ResponseDone(cancelled=true) if the response had not
finished sending, then SpeechStarted.

Caller audio is kept for at most `max_utterance_s` (plus the prefix): a longer monologue is
echoed by its last `max_utterance_s` only.

Data channel: `session.update` with `turn_detection.silence_duration_ms` retunes the end of
turn mid-session; `response.cancel` cancels the playing response; other client events are
ignored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from typing import Any

import numpy as np

from libs.observability.telemetry import log_event
from services.bridge.audio import (
    Samples,
    frame_bytes,
    pcm_to_mono,
    resample_linear,
    split_frames,
)
from services.bridge.session import Outbox, Playout, Response
from services.bridge.turns import (
    SpeechStarted,
    SpeechStopped,
    TurnComplete,
    TurnConfig,
    TurnDetector,
    VoiceActivity,
    turn_config_for_session,
)
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge.echo")


class EchoAgent:
    """One session of the echo backend. Call `start()`, feed `on_audio` / `on_data_channel`,
    then `close()` (idempotent)."""

    def __init__(
        self,
        session_id: str,
        *,
        outbox: Outbox,
        input_rate_hz: int,
        input_channels: int,
        output_rate_hz: int,
        turn_config: TurnConfig,
        vad_aggressiveness: int,
        prefix_padding_ms: int,
        max_utterance_s: float,
        playout_lead_ms: int,
    ) -> None:
        self.session_id = session_id
        self._outbox = outbox
        self._in_rate = input_rate_hz
        self._channels = input_channels
        self._out_rate = output_rate_hz
        self._base_turn_config = turn_config
        self._detector = TurnDetector(turn_config)
        self._vad = VoiceActivity(vad_aggressiveness, input_rate_hz)
        self._prefix_samples = input_rate_hz * prefix_padding_ms // 1000
        self._max_samples = int(input_rate_hz * max_utterance_s) + self._prefix_samples
        self._playout = Playout(outbox, output_rate_hz, playout_lead_ms)
        # Caller audio as (position of first sample, samples), oldest first.
        self._history: collections.deque[tuple[int, Samples]] = collections.deque()
        self._position = 0  # samples of caller audio received
        self._turn_start: int | None = None  # sample position of the open turn's start
        self._items = 0
        self._responses = 0
        self._response_task: asyncio.Task[None] | None = None
        self._response_id = ""
        self._playout_task: asyncio.Task[None] | None = None
        self.barge_ins = 0

    async def start(self) -> None:
        self._playout_task = asyncio.create_task(self._playout.run(), name="echo-playout")

    async def close(self) -> None:
        for task in (self._response_task, self._playout_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._response_task = self._playout_task = None

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        samples = pcm_to_mono(frame.data, self._channels)
        if len(samples) == 0:
            return
        self._history.append((self._position, samples))
        self._position += len(samples)
        for is_speech in self._vad.feed(samples):
            for event in self._detector.feed(is_speech):
                self._on_turn_event(event)
        self._trim_history()

    async def on_data_channel(self, text: str) -> None:
        try:
            event: Any = json.loads(text)
        except ValueError:
            log_event(logger, "echo.bad_client_event", session__id=self.session_id)
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "session.update" and isinstance(event.get("session"), dict):
            self._detector.config = turn_config_for_session(
                self._base_turn_config, event["session"]
            )
            log_event(
                logger,
                "echo.turn_config",
                session__id=self.session_id,
                end_of_turn_silence_ms=self._detector.config.end_of_turn_silence_ms,
            )
        elif kind == "response.cancel":
            self._interrupt()

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self._in_rate

    def _samples(self, ms: int) -> int:
        return ms * self._in_rate // 1000

    def _on_turn_event(self, event: SpeechStarted | SpeechStopped | TurnComplete) -> None:
        if isinstance(event, SpeechStarted):
            self._interrupt()
            self._items += 1
            self._turn_start = self._samples(event.audio_start_ms)
            self._outbox.put(
                Response(
                    speech_started=inference_pb2.SpeechStarted(
                        audio_start_ms=event.audio_start_ms, item_id=self._item_id()
                    )
                )
            )
        elif isinstance(event, SpeechStopped):
            self._outbox.put(
                Response(
                    speech_stopped=inference_pb2.SpeechStopped(
                        audio_end_ms=event.audio_end_ms, item_id=self._item_id()
                    )
                )
            )
        else:
            self._turn_start = None
            utterance = self._utterance(
                self._samples(event.audio_start_ms) - self._prefix_samples,
                self._samples(event.audio_end_ms),
            )
            self._responses += 1
            self._response_id = f"resp_echo_{self._responses}"
            self._response_task = asyncio.create_task(
                self._respond(self._response_id, utterance), name="echo-response"
            )

    def _item_id(self) -> str:
        return f"item_echo_{self._items}"

    def _interrupt(self) -> None:
        """Barge-in: stop the current response at once."""
        responding = self._response_task is not None and not self._response_task.done()
        if responding:
            assert self._response_task is not None
            self._response_task.cancel()
        if self._playout.clear():
            self._outbox.put(Response(clear=inference_pb2.ClearAudio()))
            self.barge_ins += 1
            log_event(
                logger, "echo.barge_in", session__id=self.session_id, response__id=self._response_id
            )
        if responding:
            self._outbox.put(
                Response(
                    response_done=inference_pb2.ResponseDone(
                        response_id=self._response_id, cancelled=True
                    )
                )
            )

    def _utterance(self, start: int, end: int) -> Samples:
        start = max(start, end - self._max_samples)
        parts = [
            chunk[max(0, start - pos) : max(0, end - pos)]
            for pos, chunk in self._history
            if pos < end and pos + len(chunk) > start
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def _trim_history(self) -> None:
        if self._turn_start is None:
            keep_from = self._position - self._prefix_samples
        else:
            keep_from = max(
                self._turn_start - self._prefix_samples, self._position - self._max_samples
            )
        while self._history and self._history[0][0] + len(self._history[0][1]) <= keep_from:
            self._history.popleft()

    async def _respond(self, response_id: str, utterance: Samples) -> None:
        self._outbox.put(
            Response(response_started=inference_pb2.ResponseStarted(response_id=response_id))
        )
        audio = resample_linear(utterance, self._in_rate, self._out_rate).astype("<i2").tobytes()
        size = frame_bytes(self._out_rate)
        frames, rest = split_frames(audio, size)
        if rest:
            frames.append(rest + bytes(size - len(rest)))
        for frame in frames:
            self._playout.enqueue_audio(frame)
        await self._playout.wait_sent()
        self._outbox.put(
            Response(response_done=inference_pb2.ResponseDone(response_id=response_id))
        )
        log_event(
            logger,
            "echo.response_done",
            session__id=self.session_id,
            response__id=response_id,
            frames=len(frames),
        )
