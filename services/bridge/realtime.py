"""The realtime backend: an adapter to an OpenAI-Realtime-compatible WebSocket endpoint.

One WebSocket at a time per session to `realtime_url` (Authorization: Bearer
`realtime_api_key` when set). The bridge sends `session.update` (the session's
`session_config` as given, else PCM 24 kHz in and out with server VAD tuned by our turn
settings), then the caller's audio as `input_audio_buffer.append` (base64 PCM16, mono,
24 kHz). Client data-channel events are forwarded as-is (the browser speaks the same event
protocol), but for the WebRTC-only `output_audio_buffer.clear`: the transceiver has already
dropped its audio, so the adapter drops its own queue and sends `conversation.item.truncate`
for what was heard. The model's `session.created`/`session.updated` reach the caller as they
are (`sends_session_events`).

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
- error: `classify_error` decides. Most are not fatal (a rate limit, one bad event): passed
  through as the model sent them and the call goes on (more than
  `realtime_max_errors_per_min` in a minute end it). `session_expired` replaces the socket.
  Fatal ones (authentication, quota) are passed through, then SessionEnd(BRIDGE_ERROR).
- `realtime_goaway_event` (time left in `time_left_ms` or `timeLeft`), and
  `session.expires_at` of session.created (`realtime_expiry_lead_s` ahead): the socket is
  about to close; the adapter pre-connects its successor.
- anything else (session.created, conversation.item.*, rate_limits.updated, ...): the raw
  JSON as DataChannelMessage.

Upstream sockets that end (README "Realtime upstream sockets"): a close with code 1000 and no
notice ends the session with BRIDGE_ENDED (the agent hung up). Any other end (a session
limit, a drop, an error) is a reconnect: a new socket (`realtime_reconnect_attempts` tries,
backoff from `realtime_reconnect_backoff_ms`) gets `session.update` with the configuration
the adapter and the caller sent, the conversation's text items (`Conversation`) as
`conversation.item.create`, the caller audio the old socket left unanswered and the client
events that waited; its own session events and the echoes of the replay are hidden from the
caller. After a go-away the successor is connected at once and takes over when the old
socket is quiet (no response, no speech) or `realtime_goaway_margin_ms` before the close; a
response still running there plays on from the old socket. A response cut by a drop is not
asked for again: what arrived plays, then ResponseDone(cancelled). A session whose upstream
stays unreachable ends with an `error` event and SessionEnd(BRIDGE_ERROR). Failing to
connect at the start (refused, timeout, HTTP error such as 401) refuses the session with
SessionEnd(BRIDGE_ERROR) as the first message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import enum
import functools
import itertools
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from opentelemetry import metrics

from libs.observability.metrics import BRIDGE_UPSTREAM_ERRORS, BRIDGE_UPSTREAM_RECONNECTS
from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from libs.wire.realtime_session import merge_session
from services.bridge.audio import FRAME_MS, frame_bytes, pcm_to_mono, resample_linear, split_frames
from services.bridge.backend import BackendError, SessionContext
from services.bridge.session import Playout, Response
from services.bridge.settings import BridgeSettings
from services.bridge.truncation import TruncationSource
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge.realtime")

REALTIME_RATE_HZ = 24000  # the Realtime API's "audio/pcm" rate
# Client events the adapter makes itself carry event ids with this prefix: an upstream error
# about one of them is the adapter's business, not the caller's.
OWN_EVENT_PREFIX = "voiceedge_"
# Reconnect pauses double from realtime_reconnect_backoff_ms up to this.
BACKOFF_MAX_S = 2.0
# Client events that wait for a new socket (the caller's audio waits in its own buffer).
PENDING_EVENTS_MAX = 256
# WebSocket close code 1000: the endpoint ended the conversation (RFC 6455 §7.4.1).
NORMAL_CLOSURE = 1000
ERROR_WINDOW_S = 60.0


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
class Passthrough:
    """A server event for the caller as it is (a new socket's echoes are held back)."""

    text: str
    kind: str
    item_id: str = ""


@dataclasses.dataclass(frozen=True)
class UpstreamError:
    """An `error` server event; `classify_error` says what it means for the call."""

    text: str
    error_type: str
    code: str
    message: str
    event_id: str  # the client event it is about, if any

    @property
    def detail(self) -> str:
        return f"{self.error_type or 'error'}: {self.message}"


@dataclasses.dataclass(frozen=True)
class GoAway:
    """The socket will be closed in `time_left_s` (realtime_goaway_event)."""

    time_left_s: float


@dataclasses.dataclass(frozen=True)
class Expiry:
    """The session ends at `expires_at` (Unix seconds, session.created's session)."""

    expires_at: float


@dataclasses.dataclass(frozen=True)
class Remember:
    """A conversation item's text (empty: only seen, which fixes its place in the order)."""

    role: str
    item_id: str
    text: str


Action = (
    Emit | AfterAudio | Audio | BargeIn | Passthrough | UpstreamError | GoAway | Expiry | Remember
)

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
OUTPUT_TEXT_DONES = ("response.output_text.done", "response.text.done")
SESSION_EVENTS = ("session.created", "session.updated")
FINISHED_STATUSES = ("completed", "incomplete")


class ErrorClass(enum.Enum):
    WARNING = "warning"  # logged, counted, passed to the caller; the call goes on
    RECONNECT = "reconnect"  # this socket is finished; a new one takes over
    FATAL = "fatal"  # the call cannot go on


# error.type / error.code values that no reconnect can fix (OpenAI's error shapes).
FATAL_ERROR_TYPES = frozenset({"authentication_error", "permission_error"})
FATAL_ERROR_CODES = frozenset(
    {"invalid_api_key", "insufficient_quota", "model_not_found", "account_deactivated"}
)
# OpenAI ends a session at its limit with this (invalid_request_error) and then closes.
RECONNECT_ERROR_CODES = frozenset({"session_expired"})


def classify_error(error_type: str, code: str) -> ErrorClass:
    if code in RECONNECT_ERROR_CODES:
        return ErrorClass.RECONNECT
    if error_type in FATAL_ERROR_TYPES or code in FATAL_ERROR_CODES:
        return ErrorClass.FATAL
    return ErrorClass.WARNING


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ms(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and value >= 0 else 0


def time_left_s(event: Mapping[str, Any]) -> float:
    """A go-away's time left: `time_left_ms`, or `timeLeft`/`time_left` as a protobuf
    JSON duration ("10s", "1.5s"); 0 when absent or malformed (close is imminent)."""
    ms = event.get("time_left_ms")
    if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
        return float(ms) / 1000
    text = event.get("timeLeft", event.get("time_left"))
    if isinstance(text, str) and text.endswith("s"):
        try:
            return max(0.0, float(text[:-1]))
        except ValueError:
            return 0.0
    return 0.0


class ServerEventMapper:
    """Realtime server events (parsed JSON) -> actions; keeps the partial audio frame."""

    def __init__(self, goaway_event: str = "") -> None:
        self._frame = frame_bytes(REALTIME_RATE_HZ)
        self._partial = b""
        self._item_id = ""
        self._input_items_with_deltas: set[str] = set()
        self._goaway_event = goaway_event
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
            return self.flush()
        if kind == "input_audio_buffer.speech_started":
            item = _str(event.get("item_id"))
            return [
                BargeIn(),
                Emit(
                    Response(
                        speech_started=inference_pb2.SpeechStarted(
                            audio_start_ms=_ms(event.get("audio_start_ms")), item_id=item
                        )
                    )
                ),
                *([Remember("user", item, "")] if item else []),
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
            emit = Emit(
                _transcript(event, "" if done else _str(event.get("delta")), done, output=True)
            )
            if not done:
                return [emit]
            item = _str(event.get("item_id"))
            return [emit, Remember("assistant", item, _str(event.get("transcript")))]
        if kind == "conversation.item.input_audio_transcription.delta":
            self._input_items_with_deltas.add(_str(event.get("item_id")))
            return [Emit(_transcript(event, _str(event.get("delta")), False, output=False))]
        if kind == "conversation.item.input_audio_transcription.completed":
            item = _str(event.get("item_id"))
            whole = _str(event.get("transcript"))
            # Models that give no deltas send the whole text here.
            text_left = "" if item in self._input_items_with_deltas else whole
            self._input_items_with_deltas.discard(item)
            return [
                Emit(_transcript(event, text_left, True, output=False)),
                Remember("user", item, whole),
            ]
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
            return [*self.flush(), AfterAudio(Response(response_done=finished))]
        if kind == "error":
            error = event.get("error")
            error = error if isinstance(error, dict) else {}
            return [
                UpstreamError(
                    text,
                    _str(error.get("type")),
                    _str(error.get("code")),
                    _str(error.get("message")),
                    _str(error.get("event_id")),
                )
            ]
        if self._goaway_event and kind == self._goaway_event:
            return [GoAway(time_left_s(event))]
        body: Any = event.get("item")
        item_id = _str(body.get("id")) if isinstance(body, dict) else _str(event.get("item_id"))
        actions: list[Action] = [Passthrough(text, kind, item_id)]
        if kind in OUTPUT_TEXT_DONES:
            actions.append(Remember("assistant", item_id, _str(event.get("text"))))
        session = event.get("session")
        if kind in SESSION_EVENTS and isinstance(session, dict):
            expires_at = session.get("expires_at")
            if isinstance(expires_at, int | float) and expires_at > 0:
                actions.append(Expiry(float(expires_at)))
        return actions

    def barge_in(self) -> None:
        self._partial = b""

    def flush(self) -> list[Action]:
        """The partial frame, zero-padded (the response's audio is complete or cut)."""
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


class Conversation:
    """The conversation as far as the adapter can replay it into a new socket: text items
    by id, in the order first seen. The model's audio items are kept as their transcripts
    (a user turn only if input transcription is on); the caller's own
    `conversation.item.create` items verbatim."""

    def __init__(self, max_items: int) -> None:
        self._max = max_items
        self._items: dict[str, dict[str, Any] | None] = {}
        self._ids = itertools.count(1)

    def remember(self, role: str, item_id: str, text: str) -> None:
        if not item_id:
            if not text:
                return
            item_id = f"{OWN_EVENT_PREFIX}item_{next(self._ids)}"
        if text:
            part = "input_text" if role == "user" else "output_text"
            self._items[item_id] = {
                "type": "message",
                "role": role,
                "content": [{"type": part, "text": text}],
            }
        else:
            self._items.setdefault(item_id, None)
        self._trim()

    def remember_client_item(self, item: Mapping[str, Any]) -> None:
        item_id = _str(item.get("id")) or f"{OWN_EVENT_PREFIX}item_{next(self._ids)}"
        self._items.pop(item_id, None)
        self._items[item_id] = dict(item)
        self._trim()

    def _trim(self) -> None:
        # Items only seen (no text yet) count too: a conversation of untranscribed turns
        # must not grow without end.
        while len(self._items) > 2 * self._max:
            del self._items[next(iter(self._items))]

    def replay(self) -> list[dict[str, Any]]:
        """The newest max_items items that have content, oldest first, each with its id."""
        known = [{**item, "id": item_id} for item_id, item in self._items.items() if item]
        return known[-self._max :] if self._max else []


@dataclasses.dataclass(frozen=True)
class UpstreamMetrics:
    reconnects: Any
    errors: Any


@functools.cache
def upstream_metrics(meter: metrics.Meter | None = None) -> UpstreamMetrics:
    """The adapter's instruments, made once per meter (None: the process's global one,
    which setup_telemetry installs)."""
    meter = meter or metrics.get_meter("voiceedge.bridge")
    return UpstreamMetrics(
        BRIDGE_UPSTREAM_RECONNECTS.create(meter), BRIDGE_UPSTREAM_ERRORS.create(meter)
    )


class _UnrecoverableError(BackendError):
    """The upstream refused us in a way no retry fixes (HTTP 401/403)."""


@dataclasses.dataclass(eq=False)
class Link:
    """One upstream WebSocket and what the adapter tracks of it."""

    ws: aiohttp.ClientWebSocketResponse
    number: int  # 0: the session's first socket
    task: asyncio.Task[None] | None = None
    open_responses: set[str] = dataclasses.field(default_factory=set)
    speaking: bool = False
    speech_at: float = 0.0  # loop time of the last speech_started
    replayed: set[str] = dataclasses.field(default_factory=set)
    awaiting_update: bool = False  # our session.update's session.updated is still to come
    healthy: bool = False  # answered our session.update
    stop_cause: str = ""  # set by the adapter when it finishes this socket itself
    expires_at: float | None = None  # Unix time its session.created announced
    # The caller's response.create events it has not answered with response.created yet:
    # if it goes first, they are sent again (nothing of those responses was heard).
    unanswered: collections.deque[str] = dataclasses.field(default_factory=collections.deque)

    @property
    def quiet(self) -> bool:
        """No response running and no caller speech half-heard: a swap loses nothing."""
        return not self.open_responses and not self.speaking and not self.unanswered


class RealtimeAdapter:
    """One session of the realtime backend (see the module docstring)."""

    def __init__(
        self, ctx: SessionContext, settings: BridgeSettings, meter: metrics.Meter | None = None
    ) -> None:
        self._ctx = ctx
        self._settings = settings
        self._outbox = ctx.outbox
        self._out_rate = settings.sample_rate_hz
        self._playout = Playout(ctx.outbox, settings.sample_rate_hz, settings.playout_lead_ms)
        self._mapper = ServerEventMapper(settings.realtime_goaway_event)
        self._metrics = upstream_metrics(meter)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._playing_item = ""  # output item whose audio is being played
        self._item_first_sequence = 0  # Playout sequence of that item's first frame
        self._truncations = TruncationSource(ctx.session_id)
        # The model sends session.created / session.updated itself (passed through).
        self.sends_session_events = True
        self.session_defaults: Mapping[str, Any] | None = None
        # What a new socket is told: the session as the adapter and the caller set it, and
        # the conversation so far.
        self._session = dict(ctx.session_config) or default_session(settings)
        self._conversation = Conversation(settings.realtime_replay_max_items)
        # Sockets: the one caller input goes to, its successor (connected, not yet
        # restored), and old ones still finishing a response.
        self._primary: Link | None = None
        self._standby: Link | None = None
        self._retiring: list[Link] = []
        self._connecting: asyncio.Task[aiohttp.ClientWebSocketResponse] | None = None
        self._links = itertools.count()
        self._event_ids = itertools.count(1)
        # Caller audio of the last realtime_reconnect_buffer_ms (loop time, event), and
        # client events waiting for a socket.
        self._recent_audio: collections.deque[tuple[float, str]] = collections.deque()
        self._pending: collections.deque[str] = collections.deque(maxlen=PENDING_EVENTS_MAX)
        # A socket change under way: why, since when (no primary), when the old one closes.
        self._cause = ""
        self._lost_at = 0.0
        self._lost_speech_at: float | None = None
        self._close_at: float | None = None  # loop time the announced close happens
        self._prepare_at: float | None = None  # loop time to act on session.expires_at
        self._expires_at = 0.0  # loop time of the primary's session.expires_at
        self._unhealthy_losses = 0  # sockets lost in a row before answering session.update
        self._errors: collections.deque[float] = collections.deque()
        self._wake = asyncio.Event()
        self._ended = False
        self.reconnects = 0

    # ---- lifecycle

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        try:
            ws = await self._connect()
        except BackendError:
            await self.close()
            raise
        link = self._new_link(ws)
        self._primary = link
        await self._restore(link, replay_from=None)
        self._tasks = [
            asyncio.create_task(self._playout.run(), name="realtime-playout"),
            asyncio.create_task(self._supervise(), name="realtime-supervisor"),
        ]

    async def close(self) -> None:
        self._ended = True
        links = [x for x in (self._primary, self._standby, *self._retiring) if x is not None]
        self._primary, self._standby, self._retiring = None, None, []
        tasks, self._tasks = self._tasks, []
        try:
            await cancel_and_wait(self._connecting, *tasks, *(x.task for x in links))
            await self._truncations.close()
        finally:
            # Even when this task is being cancelled itself (the caller's stream went):
            # the endpoint must see its sockets closed.
            self._connecting = None
            for link in links:
                await link.ws.close()
            if self._http is not None:
                await self._http.close()
                self._http = None

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """One WebSocket to realtime_url; BackendError says why not (401/403: unrecoverable)."""
        assert self._http is not None
        headers = {}
        if self._settings.realtime_api_key:
            headers["Authorization"] = f"Bearer {self._settings.realtime_api_key}"
        try:
            async with asyncio.timeout(self._settings.realtime_connect_timeout_s):
                return await self._http.ws_connect(
                    self._settings.realtime_url, headers=headers, max_msg_size=16 * 2**20
                )
        except aiohttp.WSServerHandshakeError as exc:
            error = _UnrecoverableError if exc.status in (401, 403) else BackendError
            raise error(self._connect_failure(exc)) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendError(self._connect_failure(exc)) from None

    def _connect_failure(self, exc: Exception) -> str:
        # The URL's query may name a model, never a secret; the key is in a header.
        return (
            f"realtime connect to {self._settings.realtime_url} failed: {type(exc).__name__} {exc}"
        )

    def _new_link(self, ws: aiohttp.ClientWebSocketResponse) -> Link:
        link = Link(ws, next(self._links))
        link.task = asyncio.create_task(self._receive(link), name=f"realtime-receive-{link.number}")
        return link

    # ---- caller -> model

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        samples = pcm_to_mono(frame.data, self._ctx.input_channels)
        pcm = resample_linear(samples, self._ctx.input_rate_hz, REALTIME_RATE_HZ)
        audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")
        text = json.dumps({"type": "input_audio_buffer.append", "audio": audio})
        now = asyncio.get_running_loop().time()
        self._recent_audio.append((now, text))
        horizon = now - self._settings.realtime_reconnect_buffer_ms / 1000
        while self._recent_audio and self._recent_audio[0][0] < horizon:
            self._recent_audio.popleft()
        # With no socket the audio waits in _recent_audio only (its time tells what to resend).
        await self._send(text, wait=False)

    async def on_data_channel(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            log_event(logger, "realtime.bad_client_event", session__id=self._ctx.session_id)
            return
        kind = event.get("type")
        if kind == "output_audio_buffer.clear":
            # WebRTC-only: the transceiver has cleared its buffer; the model's WebSocket
            # has no such event, so the adapter truncates the interrupted item instead.
            self._drop_retiring()
            await self._barge_in(clear_transceiver=False)
            return
        if kind == "session.update" and isinstance(event.get("session"), dict):
            self._session = merge_session(self._session, event["session"])
        elif kind == "conversation.item.create" and isinstance(event.get("item"), dict):
            self._conversation.remember_client_item(event["item"])
        link = self._primary
        if await self._send(text) and kind == "response.create" and link is not None:
            link.unanswered.append(text)

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

    async def _send(self, text: str, *, wait: bool = True) -> bool:
        """To the current socket (True); with none (a reconnect under way), the event waits
        for the next one (`wait`) or is dropped (audio: it is in _recent_audio)."""
        link = self._primary
        if link is not None and not link.ws.closed:
            try:
                await link.ws.send_str(text)
                return True
            except (aiohttp.ClientError, ConnectionError):
                pass  # the socket is going; its reader reports the loss
        if wait:
            self._pending.append(text)
        return False

    def _own_event_id(self, what: str) -> str:
        return f"{OWN_EVENT_PREFIX}{what}_{next(self._event_ids)}"

    async def _restore(self, link: Link, replay_from: float | None) -> None:
        """Brings a new socket to where the conversation is: the session, the text items,
        the caller audio since `replay_from` (loop time; None: none) and the waiting
        client events, in that order, before any live audio."""
        update = {
            "type": "session.update",
            "event_id": self._own_event_id("session"),
            "session": self._session,
        }
        texts = [json.dumps(update)]
        link.awaiting_update = True
        for item in self._conversation.replay() if link.number else []:
            link.replayed.add(item["id"])
            event = {
                "type": "conversation.item.create",
                "event_id": self._own_event_id("replay"),
                "item": item,
            }
            texts.append(json.dumps(event))
        if replay_from is not None:
            texts.extend(text for at, text in self._recent_audio if at >= replay_from)
        texts.extend(self._pending)
        self._pending.clear()
        try:
            for text in texts:
                await link.ws.send_str(text)
        except (aiohttp.ClientError, ConnectionError) as exc:
            if link.number == 0:
                raise BackendError(f"realtime send failed: {exc}") from None
            # The new socket went at once: its reader reports it, the supervisor goes on.

    # ---- model -> caller

    async def _receive(self, link: Link) -> None:
        cause = "closed"
        try:
            async for message in link.ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    for action in self._mapper.map(message.data):
                        if await self._apply(link, action):
                            break
                    if link.stop_cause or self._ended:
                        break
                elif message.type is aiohttp.WSMsgType.ERROR:
                    cause = "error"
                    break
        except (aiohttp.ClientError, ConnectionError):
            cause = "error"
        except Exception:  # a bug here ends this session, never the process
            logger.exception(
                "realtime.receive_crashed", extra={"kv": {"session.id": self._ctx.session_id}}
            )
            self._finish(common_pb2.CLOSE_REASON_INTERNAL_ERROR, "internal error in the bridge")
            return
        self._lost(link, link.stop_cause or cause)

    async def _apply(self, link: Link, action: Action) -> bool:
        """Carries out one action of `link`'s; True when that socket is finished."""
        if link is self._standby:
            return self._apply_standby(link, action)
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
            self._track_speech(link, action.message)
            self._outbox.put(action.message)
        elif isinstance(action, AfterAudio):
            self._track_response(link, action.message)
            self._playout.enqueue_event(action.message)
        elif isinstance(action, BargeIn):
            if link is self._primary:
                self._drop_retiring()
            await self._barge_in(clear_transceiver=True)
        elif isinstance(action, Passthrough):
            if self._shown(link, action):
                self._outbox.put(
                    Response(
                        data_channel_message=inference_pb2.DataChannelMessage(json=action.text)
                    )
                )
        elif isinstance(action, Remember):
            self._conversation.remember(action.role, action.item_id, action.text)
        elif isinstance(action, UpstreamError):
            return self._on_error(link, action)
        elif isinstance(action, GoAway):
            if link is self._primary:
                self._announce(action.time_left_s, "go_away")
        elif isinstance(action, Expiry) and link is self._primary:
            self._plan_expiry(action.expires_at)
        return False

    def _apply_standby(self, link: Link, action: Action) -> bool:
        """A successor not yet swapped in says only what a fresh session says; errors
        count, the rest is its own business."""
        if isinstance(action, UpstreamError):
            return self._on_error(link, action)
        if isinstance(action, Expiry):
            link.expires_at = action.expires_at
        return False

    def _track_speech(self, link: Link, message: Response) -> None:
        if message.HasField("speech_started"):
            link.speaking = True
            link.speech_at = asyncio.get_running_loop().time()
        elif message.HasField("speech_stopped"):
            link.speaking = False
            self._wake.set()  # a quiet moment for a pending swap

    def _track_response(self, link: Link, message: Response) -> None:
        if message.HasField("response_started"):
            link.open_responses.add(message.response_started.response_id)
            if link.unanswered:
                link.unanswered.popleft()
            if link is self._primary:
                self._drop_retiring()  # never two responses' audio interleaved
        elif message.HasField("response_done"):
            link.open_responses.discard(message.response_done.response_id)
            if link in self._retiring and link.quiet:
                self._retiring.remove(link)
                self._discard(link)
            self._wake.set()

    def _shown(self, link: Link, event: Passthrough) -> bool:
        """Whether the caller sees a passed-through event: a new socket's own session
        events and the echoes of what was replayed into it are hidden (the caller's
        session goes on as it was)."""
        if event.kind == "session.updated" and link.awaiting_update:
            link.awaiting_update = False
            link.healthy = True
            self._unhealthy_losses = 0
            return link.number == 0
        if link.number == 0:
            return True
        if event.kind == "session.created":
            return False
        return not (event.kind.startswith("conversation.item.") and event.item_id in link.replayed)

    def _on_error(self, link: Link, error: UpstreamError) -> bool:
        kind = classify_error(error.error_type, error.code)
        fatal = kind is ErrorClass.FATAL
        self._metrics.errors.add(
            1, {"error_type": error.error_type or "unknown", "fatal": str(fatal).lower()}
        )
        log_event(
            logger,
            "realtime.upstream_error",
            level=logging.WARNING,
            session__id=self._ctx.session_id,
            error__type=error.error_type,
            error__code=error.code,
            detail=error.message,
            socket=link.number,
            outcome=kind.value,
        )
        if kind is ErrorClass.RECONNECT:
            link.stop_cause = "expired"
            return True
        own = error.event_id.startswith(OWN_EVENT_PREFIX)
        if fatal:
            if link is self._standby:
                link.stop_cause = "error"
                return True
            self._pass_through(error.text)
            self._finish(common_pb2.CLOSE_REASON_BRIDGE_ERROR, error.detail)
            return True
        if not own and link is not self._standby:
            self._pass_through(error.text)  # what the model says about the caller's event
        now = asyncio.get_running_loop().time()
        self._errors.append(now)
        while self._errors and self._errors[0] < now - ERROR_WINDOW_S:
            self._errors.popleft()
        if len(self._errors) > self._settings.realtime_max_errors_per_min:
            self._fail(
                "upstream_errors",
                f"realtime upstream: {len(self._errors)} errors within a minute, "
                f"the last {error.detail}",
            )
            return True
        return False

    def _pass_through(self, text: str) -> None:
        self._outbox.put(Response(data_channel_message=inference_pb2.DataChannelMessage(json=text)))

    # ---- socket changes

    def _announce(self, time_left_s: float, cause: str) -> None:
        """The primary socket closes in `time_left_s`: connect its successor now."""
        close_at = asyncio.get_running_loop().time() + time_left_s
        if self._close_at is None or close_at < self._close_at:
            self._close_at = close_at
        self._cause = self._cause or cause
        log_event(
            logger,
            "realtime.go_away",
            session__id=self._ctx.session_id,
            time_left_s=round(time_left_s, 3),
            cause=cause,
        )
        self._wake.set()

    def _plan_expiry(self, expires_at: float) -> None:
        """Acts on session.expires_at `realtime_expiry_lead_s` ahead. One sooner than that
        is ignored (0: off): whatever it dates, a socket that would be replaced as soon as
        it opens would be replaced again and again."""
        lead_s = self._settings.realtime_expiry_lead_s
        left_s = expires_at - time.time()
        if not lead_s or left_s <= lead_s:
            return
        self._expires_at = asyncio.get_running_loop().time() + left_s
        self._prepare_at = self._expires_at - lead_s
        self._wake.set()

    def _lost(self, link: Link, cause: str) -> None:
        """A socket's reader has ended (the endpoint closed it, it broke, or the adapter
        finished it)."""
        known = link is self._primary or link is self._standby or link in self._retiring
        if self._ended or not known:
            return
        # What the socket had started and cannot finish ends here, after its audio.
        for action in self._mapper.flush() if link is self._primary else []:
            assert isinstance(action, Audio)
            self._playout.enqueue_audio(action.frame)
        for response_id in sorted(link.open_responses):
            done = inference_pb2.ResponseDone(response_id=response_id, cancelled=True)
            self._playout.enqueue_event(Response(response_done=done))
        link.open_responses.clear()
        self._pending.extendleft(reversed(link.unanswered))
        link.unanswered.clear()
        if not link.healthy and link.number:
            self._unhealthy_losses += 1
        if link is self._standby:
            self._standby = None
        elif link in self._retiring:
            self._retiring.remove(link)
        elif link is self._primary:
            code = link.ws.close_code
            if cause == "closed" and code == NORMAL_CLOSURE and self._close_at is None:
                self._finish(
                    common_pb2.CLOSE_REASON_BRIDGE_ENDED,
                    f"realtime endpoint closed the websocket (code {code})",
                )
                return
            self._primary = None
            self._lost_at = asyncio.get_running_loop().time()
            self._lost_speech_at = link.speech_at if link.speaking else None
            self._cause = self._cause or cause
            log_event(
                logger,
                "realtime.upstream_lost",
                level=logging.WARNING,
                session__id=self._ctx.session_id,
                socket=link.number,
                cause=cause,
                close_code=code,
            )
        self._discard(link)
        self._wake.set()

    def _discard(self, link: Link) -> None:
        """Closes a socket the adapter is done with, in the background."""
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()
        self._tasks.append(asyncio.create_task(_close_quietly(link.ws), name="realtime-close"))

    def _drop_retiring(self) -> None:
        """The caller barged in, or the new socket answers: responses still running on old
        sockets are over."""
        for link in list(self._retiring):
            link.stop_cause = "barge_in"
            self._lost(link, "barge_in")

    async def _supervise(self) -> None:
        """Runs socket changes: connects a successor when one is needed, swaps it in when
        the time has come, ends the session when none can be had."""
        loop = asyncio.get_running_loop()
        try:
            while not self._ended:
                timers = [t for t in (self._prepare_at, self._swap_deadline()) if t is not None]
                timeout = max(0.0, min(timers) - loop.time()) if timers else None
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                await self._step(loop.time())
        except Exception:  # a bug here ends this session, never the process
            logger.exception(
                "realtime.supervisor_crashed", extra={"kv": {"session.id": self._ctx.session_id}}
            )
            self._finish(common_pb2.CLOSE_REASON_INTERNAL_ERROR, "internal error in the bridge")

    def _swap_deadline(self) -> float | None:
        if self._close_at is None:
            return None
        return self._close_at - self._settings.realtime_goaway_margin_ms / 1000

    async def _step(self, now: float) -> None:
        if self._ended:
            return
        if self._prepare_at is not None and now >= self._prepare_at:
            self._prepare_at = None
            self._announce(max(0.0, self._expires_at - now), "go_away")
        if self._unhealthy_losses >= self._settings.realtime_reconnect_attempts:
            self._fail(
                "upstream_unstable",
                f"realtime upstream: {self._unhealthy_losses} new sockets in a row closed "
                "before answering session.update",
            )
            return
        wanted = self._primary is None or self._close_at is not None
        if wanted and self._standby is None and self._connecting is None:
            self._connecting = asyncio.create_task(
                self._connect_retrying(), name="realtime-connect"
            )
            self._connecting.add_done_callback(lambda _: self._wake.set())
        if self._connecting is not None and self._connecting.done():
            task, self._connecting = self._connecting, None
            try:
                self._standby = self._new_link(task.result())
            except BackendError as exc:
                self._metrics.errors.add(1, {"error_type": "unreachable", "fatal": "true"})
                self._fail("inference_unavailable", str(exc))
                return
        deadline = self._swap_deadline()
        if self._standby is not None and (
            self._primary is None
            or self._primary.quiet
            or (deadline is not None and now >= deadline)
        ):
            await self._swap(self._standby, now)

    async def _connect_retrying(self) -> aiohttp.ClientWebSocketResponse:
        attempts = self._settings.realtime_reconnect_attempts
        pause_s = self._settings.realtime_reconnect_backoff_ms / 1000
        for attempt in range(1, attempts + 1):
            try:
                return await self._connect()
            except _UnrecoverableError:
                raise
            except BackendError as exc:
                if attempt == attempts:
                    raise BackendError(f"{exc} ({attempts} attempts)") from None
                log_event(
                    logger,
                    "realtime.reconnect_failed",
                    level=logging.WARNING,
                    session__id=self._ctx.session_id,
                    attempt=attempt,
                    error=str(exc),
                )
            await asyncio.sleep(pause_s)
            pause_s = min(BACKOFF_MAX_S, pause_s * 2)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _swap(self, new: Link, now: float) -> None:
        """`new` becomes the socket caller input goes to. The old one, if still open, is
        closed when quiet, else left to finish its response."""
        old, self._standby = self._primary, None
        replay_from: float | None
        if old is None:
            replay_from = (
                self._lost_speech_at if self._lost_speech_at is not None else self._lost_at
            )
            gap_ms = round((now - self._lost_at) * 1000)
        else:
            replay_from = old.speech_at if old.speaking else None
            gap_ms = 0
            if old.quiet:
                old.stop_cause = "swapped"
                self._discard(old)
            else:
                self._retiring.append(old)
                if old.speaking:
                    # The speech goes on in the new socket (resent from replay_from): the
                    # old one must not answer the half it heard.
                    clear = {"type": "input_audio_buffer.clear"}
                    await _send_quietly(old.ws, json.dumps(clear))
        if replay_from is not None:
            replay_from -= self._settings.prefix_padding_ms / 1000
        self._primary = new
        await self._restore(new, replay_from)
        cause, self._cause = self._cause or "closed", ""
        self._close_at = self._prepare_at = None
        if new.expires_at is not None:
            self._plan_expiry(new.expires_at)
        self.reconnects += 1
        self._metrics.reconnects.add(1, {"cause": cause})
        log_event(
            logger,
            "realtime.upstream_replaced",
            session__id=self._ctx.session_id,
            socket=new.number,
            cause=cause,
            without_socket_ms=gap_ms,
            replayed_items=len(new.replayed),
        )

    # ---- ending

    def _fail(self, code: str, detail: str) -> None:
        """Ends the call for an upstream that cannot go on: the caller gets an `error`
        server event saying why (OpenAI's shape), the transceiver SessionEnd(BRIDGE_ERROR)."""
        error = {
            "type": "error",
            "event_id": self._own_event_id("error"),
            "error": {"type": "server_error", "code": code, "message": detail, "param": None},
        }
        self._pass_through(json.dumps(error))
        self._finish(common_pb2.CLOSE_REASON_BRIDGE_ERROR, detail)

    def _finish(self, reason: common_pb2.CloseReason.ValueType, detail: str) -> None:
        if self._ended:
            return
        self._ended = True
        log_event(
            logger,
            "realtime.session_end",
            level=logging.WARNING,
            session__id=self._ctx.session_id,
            detail=detail,
        )
        self._outbox.end(reason, detail)
        self._wake.set()


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
    try:
        async with asyncio.timeout(2.0):
            await ws.close()
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        pass


async def _send_quietly(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    with contextlib.suppress(aiohttp.ClientError, ConnectionError):
        await ws.send_str(text)
