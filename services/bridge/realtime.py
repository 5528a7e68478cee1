"""The realtime backend: an adapter to an OpenAI-Realtime-compatible WebSocket endpoint.

One WebSocket per session to `realtime_url` (Authorization: Bearer `realtime_api_key` when
set). The bridge sends `session.update` (the session's `session_config` as given, else PCM
24 kHz in and out with server VAD tuned by our turn settings), then the caller's audio as
`input_audio_buffer.append` (base64 PCM16, mono, 24 kHz). Client data-channel events are
forwarded as-is (the browser speaks the same event protocol), but for the WebRTC-only
`output_audio_buffer.clear`: the transceiver has already dropped its audio, so the adapter
drops its own queue and sends `conversation.item.truncate` for what was heard. The model's
`session.created`/`session.updated` reach the caller as they are (`sends_session_events`).

Server events (`ServerEventMapper`, pure) -> messages to the transceiver:

- response.output_audio.delta (and legacy response.audio.delta): AudioFrames, 20 ms each,
  paced by Playout; response.output_audio.done / response.audio.done flush a partial frame
  (zero-padded).
- input_audio_buffer.speech_started: ClearAudio (if response audio is queued or playing),
  then SpeechStarted; the server gets `conversation.item.truncate` with the played
  duration of the interrupted item (from the transceiver's PlayoutReport, truncation.py;
  estimated from the pacing when none comes).
- input_audio_buffer.speech_stopped: SpeechStopped.
- response.output_audio_transcript.delta / .done (and response.audio_transcript.*):
  TranscriptDelta, source OUTPUT, final on done.
- conversation.item.input_audio_transcription.delta / .completed: TranscriptDelta, source
  INPUT, final on completed (which carries the whole text if no delta came before).
- response.created: ResponseStarted; response.done: ResponseDone (cancelled unless status
  is completed or incomplete). Both queued behind earlier response audio, to keep order.
- error: the event as DataChannelMessage, then SessionEnd(BRIDGE_ERROR, "type: message").
- anything else (session.created, conversation.item.*, rate_limits.updated, ...): the raw
  JSON as DataChannelMessage.

The WebSocket closing ends the session with BRIDGE_ENDED; failing to connect (refused,
timeout, HTTP error such as 401) refuses the session with SessionEnd(BRIDGE_ERROR) as the
first message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from services.bridge.audio import FRAME_MS, frame_bytes, pcm_to_mono, resample_linear, split_frames
from services.bridge.backend import BackendError, SessionContext
from services.bridge.session import Playout, Response
from services.bridge.settings import BridgeSettings
from services.bridge.truncation import TruncationSource
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge.realtime")

REALTIME_RATE_HZ = 24000  # the Realtime API's "audio/pcm" rate


@dataclasses.dataclass(frozen=True)
class Emit:
    """Send now (speech events, transcripts, data-channel JSON)."""

    message: Response


@dataclasses.dataclass(frozen=True)
class AfterAudio:
    """Send once the audio queued before it has been sent (response boundaries)."""

    message: Response


@dataclasses.dataclass(frozen=True)
class Audio:
    """One 20 ms PCM16 frame at REALTIME_RATE_HZ, of conversation item `item_id`."""

    frame: bytes
    item_id: str = ""


@dataclasses.dataclass(frozen=True)
class BargeIn:
    """Drop queued response audio; tell the transceiver to clear if any was playing."""


@dataclasses.dataclass(frozen=True)
class End:
    reason: common_pb2.CloseReason.ValueType
    detail: str


Action = Emit | AfterAudio | Audio | BargeIn | End

AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
AUDIO_DONES = ("response.output_audio.done", "response.audio.done")
OUTPUT_TRANSCRIPT_DELTAS = (
    "response.output_audio_transcript.delta",
    "response.audio_transcript.delta",
)
OUTPUT_TRANSCRIPT_DONES = (
    "response.output_audio_transcript.done",
    "response.audio_transcript.done",
)
FINISHED_STATUSES = ("completed", "incomplete")


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ms(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and value >= 0 else 0


class ServerEventMapper:
    """Realtime server events (parsed JSON) -> actions; keeps the partial audio frame."""

    def __init__(self) -> None:
        self._frame = frame_bytes(REALTIME_RATE_HZ)
        self._partial = b""
        self._item_id = ""
        self._input_items_with_deltas: set[str] = set()
        self.bad_events = 0

    def map(self, text: str) -> list[Action]:
        try:
            event: Any = json.loads(text)
        except ValueError:
            self.bad_events += 1
            return []
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.bad_events += 1
            return []
        kind: str = event["type"]
        if kind in AUDIO_DELTAS:
            try:
                pcm = base64.b64decode(_str(event.get("delta")), validate=True)
            except (binascii.Error, ValueError):
                self.bad_events += 1
                return []
            self._item_id = _str(event.get("item_id"))
            frames, self._partial = split_frames(self._partial + pcm, self._frame)
            return [Audio(f, self._item_id) for f in frames]
        if kind in AUDIO_DONES:
            return self._flush()
        if kind == "input_audio_buffer.speech_started":
            return [
                BargeIn(),
                Emit(
                    Response(
                        speech_started=inference_pb2.SpeechStarted(
                            audio_start_ms=_ms(event.get("audio_start_ms")),
                            item_id=_str(event.get("item_id")),
                        )
                    )
                ),
            ]
        if kind == "input_audio_buffer.speech_stopped":
            return [
                Emit(
                    Response(
                        speech_stopped=inference_pb2.SpeechStopped(
                            audio_end_ms=_ms(event.get("audio_end_ms")),
                            item_id=_str(event.get("item_id")),
                        )
                    )
                )
            ]
        if kind in OUTPUT_TRANSCRIPT_DELTAS or kind in OUTPUT_TRANSCRIPT_DONES:
            done = kind in OUTPUT_TRANSCRIPT_DONES
            return [
                Emit(
                    _transcript(event, "" if done else _str(event.get("delta")), done, output=True)
                )
            ]
        if kind == "conversation.item.input_audio_transcription.delta":
            self._input_items_with_deltas.add(_str(event.get("item_id")))
            return [Emit(_transcript(event, _str(event.get("delta")), False, output=False))]
        if kind == "conversation.item.input_audio_transcription.completed":
            item = _str(event.get("item_id"))
            # Models that give no deltas send the whole text here.
            text_left = (
                "" if item in self._input_items_with_deltas else _str(event.get("transcript"))
            )
            self._input_items_with_deltas.discard(item)
            return [Emit(_transcript(event, text_left, True, output=False))]
        response = event.get("response")
        response = response if isinstance(response, dict) else {}
        if kind == "response.created":
            started = inference_pb2.ResponseStarted(response_id=_str(response.get("id")))
            return [AfterAudio(Response(response_started=started))]
        if kind == "response.done":
            finished = inference_pb2.ResponseDone(
                response_id=_str(response.get("id")),
                cancelled=_str(response.get("status")) not in FINISHED_STATUSES,
            )
            return [*self._flush(), AfterAudio(Response(response_done=finished))]
        passthrough = Emit(
            Response(data_channel_message=inference_pb2.DataChannelMessage(json=text))
        )
        if kind == "error":
            error = event.get("error")
            error = error if isinstance(error, dict) else {}
            detail = f"{_str(error.get('type')) or 'error'}: {_str(error.get('message'))}"
            return [passthrough, End(common_pb2.CLOSE_REASON_BRIDGE_ERROR, detail)]
        return [passthrough]

    def barge_in(self) -> None:
        self._partial = b""

    def _flush(self) -> list[Action]:
        if not self._partial:
            return []
        frame = self._partial + bytes(self._frame - len(self._partial))
        self._partial = b""
        return [Audio(frame, self._item_id)]


def _transcript(event: dict[str, Any], delta: str, final: bool, *, output: bool) -> Response:
    return Response(
        transcript_delta=inference_pb2.TranscriptDelta(
            item_id=_str(event.get("item_id")),
            delta=delta,
            final=final,
            source=inference_pb2.TRANSCRIPT_SOURCE_OUTPUT
            if output
            else inference_pb2.TRANSCRIPT_SOURCE_INPUT,
        )
    )


def default_session(settings: BridgeSettings) -> dict[str, Any]:
    """session.update body when the caller gave no session_config (GA event shape)."""
    pcm = {"type": "audio/pcm", "rate": REALTIME_RATE_HZ}
    return {
        "type": "realtime",
        "audio": {
            "input": {
                "format": pcm,
                "turn_detection": {
                    "type": "server_vad",
                    "silence_duration_ms": settings.end_of_turn_silence_ms,
                    "prefix_padding_ms": settings.prefix_padding_ms,
                    "interrupt_response": True,
                },
            },
            "output": {"format": pcm},
        },
    }


class RealtimeAdapter:
    """One session of the realtime backend (see the module docstring)."""

    def __init__(self, ctx: SessionContext, settings: BridgeSettings) -> None:
        self._ctx = ctx
        self._settings = settings
        self._outbox = ctx.outbox
        self._out_rate = settings.sample_rate_hz
        self._playout = Playout(ctx.outbox, settings.sample_rate_hz, settings.playout_lead_ms)
        self._mapper = ServerEventMapper()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._playing_item = ""  # output item whose audio is being played
        self._item_first_sequence = 0  # Playout sequence of that item's first frame
        self._truncations = TruncationSource(ctx.session_id)
        # The model sends session.created / session.updated itself (passed through).
        self.sends_session_events = True
        self.session_defaults: Mapping[str, Any] | None = None

    async def start(self) -> None:
        headers = {}
        if self._settings.realtime_api_key:
            headers["Authorization"] = f"Bearer {self._settings.realtime_api_key}"
        self._http = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._settings.realtime_connect_timeout_s):
                self._ws = await self._http.ws_connect(
                    self._settings.realtime_url, headers=headers, max_msg_size=16 * 2**20
                )
            session = dict(self._ctx.session_config) or default_session(self._settings)
            await self._ws.send_str(json.dumps({"type": "session.update", "session": session}))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self.close()
            # The URL's query may name a model, never a secret; the key is in a header.
            raise BackendError(
                f"realtime connect to {self._settings.realtime_url} failed: "
                f"{type(exc).__name__} {exc}"
            ) from None
        self._tasks = [
            asyncio.create_task(self._playout.run(), name="realtime-playout"),
            asyncio.create_task(self._receive(self._ws), name="realtime-receive"),
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        await self._truncations.close()
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        samples = pcm_to_mono(frame.data, self._ctx.input_channels)
        pcm = resample_linear(samples, self._ctx.input_rate_hz, REALTIME_RATE_HZ)
        audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")
        await self._send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))

    async def on_data_channel(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            log_event(logger, "realtime.bad_client_event", session__id=self._ctx.session_id)
            return
        if event.get("type") == "output_audio_buffer.clear":
            # WebRTC-only: the transceiver has cleared its buffer; the model's WebSocket
            # has no such event, so the adapter truncates the interrupted item instead.
            await self._barge_in(clear_transceiver=False)
            return
        await self._send(text)

    async def _barge_in(self, *, clear_transceiver: bool) -> None:
        """Drops the answer's queued audio and tells the model how much was heard. The
        transceiver is told to clear too, unless it already did (the caller's
        `output_audio_buffer.clear`)."""
        self._mapper.barge_in()
        played_frames = self._playout.played_sequence() - self._item_first_sequence
        if self._playout.clear() or not clear_transceiver:
            if clear_transceiver:
                self._outbox.put(Response(clear=inference_pb2.ClearAudio()))
            log_event(logger, "realtime.barge_in", session__id=self._ctx.session_id)
            # What was heard: the transceiver's PlayoutReport on this clear, else (none in
            # time) the estimate from the pacing.
            estimate_ms = max(0, played_frames) * FRAME_MS
            self._truncations.expect(
                self._playing_item, self._item_first_sequence, estimate_ms, self._truncate
            )
        self._playing_item = ""

    async def on_playout_report(self, report: inference_pb2.PlayoutReport) -> None:
        """The transceiver's answer to a clear (PlayoutListener): the exact truncation."""
        heard = await self._truncations.on_report(report)
        if heard is not None:
            await self._truncate(*heard)

    async def _truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Tells the model how much of its answer the caller heard before interrupting, so
        its context matches what was actually said (the WebSocket interface leaves this to
        the client; `audio_end_ms` is estimated from what was paced out)."""
        event = {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": audio_end_ms,
        }
        await self._send(json.dumps(event))

    async def _send(self, text: str) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise BackendError("realtime websocket is closed")
        try:
            await ws.send_str(text)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BackendError(f"realtime send failed: {exc}") from None

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await self._receive_events(ws)
        except (aiohttp.ClientError, ConnectionError, BackendError) as exc:
            self._outbox.end(common_pb2.CLOSE_REASON_BRIDGE_ERROR, f"realtime receive: {exc}")
        except Exception:  # a bug here ends this session, never the process
            logger.exception(
                "realtime.receive_crashed", extra={"kv": {"session.id": self._ctx.session_id}}
            )
            self._outbox.end(common_pb2.CLOSE_REASON_INTERNAL_ERROR, "internal error in the bridge")

    async def _receive_events(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                for action in self._mapper.map(message.data):
                    if await self._apply(action):
                        return
            elif message.type is aiohttp.WSMsgType.ERROR:
                self._outbox.end(
                    common_pb2.CLOSE_REASON_BRIDGE_ERROR,
                    f"realtime websocket error: {ws.exception()}",
                )
                return
        self._outbox.end(
            common_pb2.CLOSE_REASON_BRIDGE_ENDED,
            f"realtime endpoint closed the websocket (code {ws.close_code})",
        )

    async def _apply(self, action: Action) -> bool:
        """Carries out one action; True when the session ends."""
        if isinstance(action, Audio):
            if action.item_id != self._playing_item:
                self._playing_item = action.item_id
                self._item_first_sequence = self._playout.sequence + self._playout.queued_frames
            frame = action.frame
            if self._out_rate != REALTIME_RATE_HZ:
                samples = pcm_to_mono(frame, 1)
                frame = resample_linear(samples, REALTIME_RATE_HZ, self._out_rate).tobytes()
            self._playout.enqueue_audio(frame)
        elif isinstance(action, Emit):
            self._outbox.put(action.message)
        elif isinstance(action, AfterAudio):
            self._playout.enqueue_event(action.message)
        elif isinstance(action, BargeIn):
            await self._barge_in(clear_transceiver=True)
        else:
            log_event(
                logger,
                "realtime.session_end",
                level=logging.WARNING,
                session__id=self._ctx.session_id,
                detail=action.detail,
            )
            self._outbox.end(action.reason, action.detail)
            return True
        return False
