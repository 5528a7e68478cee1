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

Session: the agent keeps the session object (SessionStart.session_config, then every
`session.update` merged over it; libs/wire/realtime_session.py) and follows its turn
detection: `silence_duration_ms` retunes the end of turn, `create_response: false` leaves
answering to `response.create`, and `turn_detection: null` is push-to-talk: no voice
activity events; `input_audio_buffer.commit` makes the audio since the last commit or
clear an item (`input_audio_buffer.committed`, or an `error` if under 100 ms) and
`response.create` plays it back. The transceiver answers `session.update` with
`session.updated` (`session_defaults` tells it the agent's own defaults).

Client events: `response.cancel` cancels the playing response (audio not yet sent to the
transceiver is dropped; what it has queued still plays, as with OpenAI's WebRTC API);
`output_audio_buffer.clear` does the same, and the transceiver has dropped its queue;
`input_audio_buffer.clear` drops the audio not yet committed (and an open turn);
`response.create` answers with the last committed utterance (an empty response if there is
none). Other client events are ignored.

Think time: `echo_think_ms` holds each answer's audio back that long after ResponseStarted,
as a model thinking would; latency tests measure it end to end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from libs.wire.realtime_session import MISSING, merge_session, turn_detection
from services.bridge.audio import (
    Samples,
    frame_bytes,
    pcm_to_mono,
    resample_linear,
    split_frames,
)
from services.bridge.backend import SessionContext
from services.bridge.session import Playout, Response
from services.bridge.settings import BridgeSettings
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

MIN_COMMIT_MS = 100  # OpenAI refuses to commit less (input_audio_buffer_commit_empty)
_EMPTY: Samples = np.zeros(0, dtype=np.int16)


def base_turn_config(settings: BridgeSettings) -> TurnConfig:
    """The turn detector's knobs before a session's own turn_detection applies."""
    return TurnConfig(
        speech_start_ms=settings.speech_start_ms,
        end_of_turn_silence_ms=settings.end_of_turn_silence_ms,
        short_utterance_ms=settings.short_utterance_ms,
        short_utterance_extra_silence_ms=settings.short_utterance_extra_silence_ms,
    )


class EchoAgent:
    """One session of the echo backend. Call `start()`, feed `on_audio` / `on_data_channel`,
    then `close()` (idempotent)."""

    UTTERANCE_TAIL_MS = 0

    def __init__(self, ctx: SessionContext, settings: BridgeSettings) -> None:
        self.session_id = ctx.session_id
        self._outbox = ctx.outbox
        self._in_rate = ctx.input_rate_hz
        self._channels = ctx.input_channels
        self._out_rate = settings.sample_rate_hz
        turn_config = base_turn_config(settings)
        self._base_turn_config = turn_config
        self._detector = TurnDetector(turn_config)
        floor = settings.vad_energy_floor_dbfs
        self._vad = VoiceActivity(
            settings.vad_aggressiveness, ctx.input_rate_hz, floor if floor > -120 else None
        )
        self._prefix_samples = ctx.input_rate_hz * settings.prefix_padding_ms // 1000
        # Audio kept after the detected end of speech in a turn's utterance (none: the echo
        # repeats exactly what was said; the end-of-turn silence is in the history by then).
        self._tail_samples = ctx.input_rate_hz * self.UTTERANCE_TAIL_MS // 1000
        self._max_samples = int(ctx.input_rate_hz * settings.max_utterance_s) + self._prefix_samples
        self._playout = Playout(ctx.outbox, settings.sample_rate_hz, settings.playout_lead_ms)
        self._think_s = settings.echo_think_ms / 1000.0
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
        self._session: dict[str, Any] = {}
        self._manual = False  # turn_detection null: the client commits (push-to-talk)
        self._create_response = True
        self._input_start = 0  # sample position where the uncommitted input begins
        self._committed: Samples | None = None  # the last committed utterance
        # SessionAccepted: the transceiver answers session.update with the agent's view.
        self.sends_session_events = False
        detection = {
            "type": "server_vad",
            "silence_duration_ms": turn_config.end_of_turn_silence_ms,
            "prefix_padding_ms": settings.prefix_padding_ms,
            "create_response": True,
            "interrupt_response": True,
        }
        self.session_defaults: Mapping[str, Any] | None = {
            "audio": {"input": {"turn_detection": detection}}
        }
        self._apply_session(ctx.session_config)

    def _apply_session(self, update: Mapping[str, Any]) -> None:
        self._session = merge_session(self._session, update)
        detection = turn_detection(self._session)
        manual = detection is None
        if manual and not self._manual:
            self._clear_input()  # push-to-talk input starts now
        self._manual = manual
        self._create_response = not (
            isinstance(detection, Mapping) and detection.get("create_response") is False
        )
        self._detector.config = turn_config_for_session(self._base_turn_config, self._session)
        if detection is not MISSING:
            log_event(
                logger,
                "echo.turn_config",
                session__id=self.session_id,
                manual=manual,
                end_of_turn_silence_ms=self._detector.config.end_of_turn_silence_ms,
            )

    async def start(self) -> None:
        self._playout_task = asyncio.create_task(self._playout.run(), name="echo-playout")

    async def close(self) -> None:
        tasks, self._response_task, self._playout_task = (
            (self._response_task, self._playout_task),
            None,
            None,
        )
        await cancel_and_wait(*tasks)

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        samples = pcm_to_mono(frame.data, self._channels)
        if len(samples) == 0:
            return
        self._history.append((self._position, samples))
        self._position += len(samples)
        if not self._manual:
            for voice in self._vad.frames(samples):
                for event in self._detector.feed(voice.is_speech, speech_ms=voice.speech_ms):
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
            self._apply_session(event["session"])
        elif kind == "response.cancel":
            # As OpenAI's WebRTC API: cancelling stops the answer, but what the transceiver
            # has queued still plays unless the client also sends output_audio_buffer.clear.
            self._interrupt(clear_transceiver=False)
        elif kind == "output_audio_buffer.clear":
            self._interrupt(clear_transceiver=False)
        elif kind == "input_audio_buffer.commit":
            self._commit()
        elif kind == "input_audio_buffer.clear":
            self._clear_input()
            self._event({"type": "input_audio_buffer.cleared"})
        elif kind == "response.create":
            utterance, self._committed = self._committed, None
            self._start_response(utterance if utterance is not None else _EMPTY)

    def _event(self, event: dict[str, Any]) -> None:
        """A server event of the agent's own (the transceiver adds its event_id)."""
        self._outbox.put(
            Response(data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(event)))
        )

    def _commit(self) -> None:
        """input_audio_buffer.commit: the audio since the last commit or clear is an item."""
        start = self._turn_start if self._turn_start is not None else self._input_start
        end = self._position
        if end - start < self._samples(MIN_COMMIT_MS):
            self._event(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "input_audio_buffer_commit_empty",
                        "message": f"Less than {MIN_COMMIT_MS} ms of audio to commit.",
                        "param": None,
                    },
                }
            )
            return
        self._interrupt_turn()
        self._items += 1
        self._committed = self._utterance(start, end)
        self._input_start = end
        self._event_committed()

    def _event_committed(self) -> None:
        """`input_audio_buffer.committed` for the current item (a turn's end, or a commit)."""
        self._event(
            {
                "type": "input_audio_buffer.committed",
                "item_id": self._item_id(),
                "previous_item_id": None,
            }
        )

    def _interrupt_turn(self) -> None:
        """Forgets the open turn (the detector starts afresh)."""
        self._turn_start = None
        self._detector = TurnDetector(self._detector.config)

    def _clear_input(self) -> None:
        """Drops the open turn and all input not yet committed."""
        self._interrupt_turn()
        self._input_start = self._position

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
            end = self._samples(event.audio_end_ms)
            utterance = self._utterance(
                self._samples(event.audio_start_ms) - self._prefix_samples,
                min(end + self._tail_samples, self._position),
            )
            self._input_start = end
            self._event_committed()
            if self._create_response:
                self._start_response(utterance)
            else:
                self._committed = utterance

    def _start_response(self, utterance: Samples) -> None:
        self._interrupt()
        self._responses += 1
        self._response_id = f"resp_echo_{self._responses}"
        self._response_task = asyncio.create_task(
            self._respond(self._response_id, utterance), name="echo-response"
        )

    def _item_id(self) -> str:
        return f"item_echo_{self._items}"

    def _interrupt(self, *, clear_transceiver: bool = True) -> None:
        """Barge-in: stop the current response at once. The transceiver is told to drop the
        audio it has queued, unless it already did (the client's output_audio_buffer.clear)."""
        responding = self._response_task is not None and not self._response_task.done()
        if responding:
            assert self._response_task is not None
            self._response_task.cancel()
            self._response_task = None  # cancelled once: a second interrupt finds nothing
        if self._playout.clear() and clear_transceiver:
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
        if self._manual:
            keep_from = max(self._input_start, self._position - self._max_samples)
        elif self._turn_start is None:
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
        if self._think_s:
            await asyncio.sleep(self._think_s)  # a barge-in meanwhile cancels the response
        audio = resample_linear(utterance, self._in_rate, self._out_rate).astype("<i2").tobytes()
        frames = await self._play(audio)
        self._outbox.put(
            Response(response_done=inference_pb2.ResponseDone(response_id=response_id))
        )
        log_event(
            logger,
            "echo.response_done",
            session__id=self.session_id,
            response__id=response_id,
            frames=frames,
        )

    async def _play(self, audio: bytes) -> int:
        """Queues response audio (at the output rate) as 20 ms frames, the last one padded
        with silence; returns once all are sent, with their count."""
        size = frame_bytes(self._out_rate)
        frames, rest = split_frames(audio, size)
        if rest:
            frames.append(rest + bytes(size - len(rest)))
        for frame in frames:
            self._playout.enqueue_audio(frame)
        await self._playout.wait_sent()
        return len(frames)
