"""The OpenAI Realtime event protocol as the caller's `oai-events` data channel (and a
call's sideband WebSocket) sees it: which server events the transceiver sends, which
client events it answers itself, and what it hands on to the bridge.

Pure: no sockets, no clock, no aiortc. The Session feeds it bridge messages, client events
and one bit per playout tick, and sends the JSON texts it returns. The full event table
(data channel <-> bridge protocol <-> realtime adapter) is in README.md; the rules:

- Every server event carries a unique `event_id` (added to bridge JSON that has none).
- The session object: unless the bridge says it sends `session.created`/`session.updated`
  itself (SessionAccepted.sends_session_events, as the realtime adapter does with the
  model's own), the transceiver sends `session.created` once the bridge accepted, and a
  `session.updated` for every `session.update`, with the session as merged from the
  bridge's defaults, SessionStart.session_config and every update since.
- The transceiver owns playout, so it reports it: `output_audio_buffer.started` when a
  response's first audio is played, `.stopped` once the response is done and its audio
  drained, `.cleared` when the buffer is dropped (the bridge's ClearAudio, or the client's
  `output_audio_buffer.clear`, which is also handed to the bridge so it stops generating).
- Typed bridge messages become the current GA event names and shapes
  (`response.output_audio_transcript.*`, input transcription `completed` with
  `content_index` and the whole `transcript`).
- A client event that is not a JSON object with a string `type` is answered with an
  `error` event to its sender only, and goes nowhere else.
- A session the server ends (drain, the bridge's stream broken, an internal error) tells
  the caller why with one last `error` event (`server_error`, a code per close reason:
  ENDINGS) before the peer connection closes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any

from libs.wire.realtime_session import merge_session
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

# Playout ticks (20 ms) with no audio after a finished response before `stopped`.
STOPPED_AFTER_IDLE_TICKS = 5
# Conversation items whose speech span or partial transcript is kept for a later event: a
# bridge that never finishes a transcript (or sends none, as the echo) must not grow them.
ITEMS_REMEMBERED = 32
# Events a slow sideband reader may fall behind by before it is cut off.
SIDEBAND_BACKLOG_MAX = 1024

_JSON_SEPARATORS = (",", ":")

# Close reasons the server decides, and the `error` (code, message) that tells the caller;
# the caller's own ends (hang-up) and the ones it cannot hear (ICE, consent) have none.
ENDINGS: dict[int, tuple[str, str]] = {
    common_pb2.CLOSE_REASON_DRAINED: (
        "server_shutting_down",
        "The server handling this call is shutting down; the call has ended. Start a new call.",
    ),
    common_pb2.CLOSE_REASON_BRIDGE_ERROR: (
        "inference_unavailable",
        "The inference backend of this call became unavailable; the call has ended.",
    ),
    common_pb2.CLOSE_REASON_INTERNAL_ERROR: (
        "internal_error",
        "The server ended the call after an internal error.",
    ),
}


def _dumps(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=_JSON_SEPARATORS)


def _remember(table: dict[Any, Any], key: Any, value: Any) -> None:
    """table[key] = value, forgetting the oldest entries past ITEMS_REMEMBERED."""
    table.pop(key, None)
    table[key] = value
    while len(table) > ITEMS_REMEMBERED:
        del table[next(iter(table))]


def event_ids(prefix: str | None = None) -> Callable[[], str]:
    """Unique event ids: `event_` + a random per-session prefix + a counter (hex)."""
    stem = "event_" + (prefix if prefix is not None else secrets.token_hex(4))
    numbers = count(1)
    return lambda: f"{stem}{next(numbers):x}"


@dataclass(frozen=True, slots=True)
class ClientOutcome:
    """What to do with one client event."""

    to_bridge: str | None = None  # the event text, handed on to the bridge
    clear_playout: bool = False  # drop queued response audio now
    broadcast: tuple[str, ...] = ()  # server events for the data channel and every sideband
    reply: tuple[str, ...] = ()  # server events for the sender only


class RealtimeEvents:
    """One session's event protocol state: the session object, the current response, the
    transcripts so far and whether response audio is playing."""

    def __init__(
        self,
        session_id: str,
        session_config: Mapping[str, Any] | None = None,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self._new_id = new_id or event_ids()
        self._config: dict[str, Any] = dict(session_config or {})
        self.session: dict[str, Any] = self._base(session_id)
        self.sends_session_events = False
        self._accepted = False
        self.response_id = ""
        self._response_finished = True  # no response open: audio alone starts and stops
        self.output_active = False  # response audio is playing (started, not yet stopped)
        self.idle_ticks = 0  # playout ticks without audio since output_active
        self._client_cancelled = False  # the client cancelled the open response
        self._transcripts: dict[tuple[int, str], str] = {}  # (source, item) -> text so far
        self._speech: dict[str, tuple[int, int]] = {}  # item -> (start ms, end ms)

    @staticmethod
    def _base(session_id: str) -> dict[str, Any]:
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": "sess_" + session_id,
            "output_modalities": ["audio"],
        }

    # ---- server events

    def _event(self, kind: str, **fields: Any) -> str:
        return _dumps({"type": kind, "event_id": self._new_id(), **fields})

    def accepted(
        self, sends_session_events: bool, defaults: Mapping[str, Any] | None = None
    ) -> list[str]:
        """The bridge accepted: `session.created`, unless the bridge sends its own."""
        self._accepted = True
        self.sends_session_events = sends_session_events
        if sends_session_events:
            return []
        session = merge_session(self.session, defaults or {})
        self.session = merge_session(session, self._config)
        self.session["type"] = "realtime"
        return [self.session_created()]

    def session_created(self) -> str:
        """`session.created` with the session as it is now (also what a new sideband gets)."""
        return self._event("session.created", session=self.session)

    def from_bridge(self, message: inference_pb2.StreamSessionResponse) -> list[str]:
        """Server events for one bridge message (none for audio and control)."""
        kind = message.WhichOneof("payload")
        if kind == "data_channel_message":
            text = self._passthrough(message.data_channel_message.json)
            return [text] if text is not None else []
        if kind == "speech_started":
            started = message.speech_started
            _remember(self._speech, started.item_id, (started.audio_start_ms,) * 2)
            return [
                self._event(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=started.audio_start_ms,
                    item_id=started.item_id,
                )
            ]
        if kind == "speech_stopped":
            stopped = message.speech_stopped
            start = self._speech.get(stopped.item_id, (stopped.audio_end_ms, 0))[0]
            _remember(self._speech, stopped.item_id, (start, stopped.audio_end_ms))
            return [
                self._event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=stopped.audio_end_ms,
                    item_id=stopped.item_id,
                )
            ]
        if kind == "transcript_delta":
            return [self._transcript(message.transcript_delta)]
        if kind == "response_started":
            self.response_id = message.response_started.response_id
            self._response_finished = False
            self._client_cancelled = False
            return [self._event("response.created", response=self._response("in_progress"))]
        if kind == "response_done":
            done = message.response_done
            self._response_finished = True
            response = self._response("cancelled" if done.cancelled else "completed")
            response["id"] = done.response_id or self.response_id
            if done.cancelled:
                reason = "client_cancelled" if self._client_cancelled else "turn_detected"
                response["status_details"] = {"type": "cancelled", "reason": reason}
            self._client_cancelled = False
            return [self._event("response.done", response=response)]
        return []

    def cleared_by_bridge(self, frames_dropped: int) -> list[str]:
        """The bridge's ClearAudio: `cleared`, if the caller had anything to lose (audio
        playing or queued); a clear after `stopped` changes nothing the caller hears."""
        if frames_dropped or self.output_active:
            return [self.cleared()]
        return []

    def _response(self, status: str) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "realtime.response",
            "status": status,
            "output": [],
            "output_modalities": ["audio"],
        }

    def _transcript(self, t: inference_pb2.TranscriptDelta) -> str:
        key = (int(t.source), t.item_id)
        text = self._transcripts.get(key, "") + t.delta
        if t.final:
            self._transcripts.pop(key, None)
        else:
            _remember(self._transcripts, key, text)
        if t.source == inference_pb2.TRANSCRIPT_SOURCE_INPUT:
            if not t.final:
                return self._event(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=t.item_id,
                    content_index=0,
                    delta=t.delta,
                )
            start, end = self._speech.pop(t.item_id, (0, 0))
            return self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=t.item_id,
                content_index=0,
                transcript=text,
                usage={"type": "duration", "seconds": max(0, end - start) / 1000.0},
            )
        where = {
            "response_id": self.response_id,
            "item_id": t.item_id,
            "output_index": 0,
            "content_index": 0,
        }
        if not t.final:
            return self._event("response.output_audio_transcript.delta", **where, delta=t.delta)
        return self._event("response.output_audio_transcript.done", **where, transcript=text)

    def _passthrough(self, text: str) -> str | None:
        """Bridge JSON to the caller: as it is, but for a missing event_id. What is not a
        JSON object is dropped (a caller's SDK would choke on it)."""
        try:
            event: Any = json.loads(text)
        except ValueError:
            return None
        if not isinstance(event, dict):
            return None
        if event.get("type") in ("session.created", "session.updated") and isinstance(
            event.get("session"), dict
        ):
            self.session = event["session"]  # the model's own view, for sidebands
        if isinstance(event.get("event_id"), str) and event["event_id"]:
            return text
        event["event_id"] = self._new_id()
        return _dumps(event)

    def cleared(self) -> str:
        """The output buffer was dropped: no `stopped` follows for this response."""
        self.output_active = False
        self.idle_ticks = 0
        return self._event("output_audio_buffer.cleared", response_id=self.response_id)

    def playout(self, played: bool) -> str | None:
        """One playout tick: `played` is true when response audio (not fill) went out. The
        Session calls it only when `played` differs from `output_active`, or when audio
        plays again after idle ticks (`idle_ticks`): a tick per 20 ms is the hot path."""
        if played:
            self.idle_ticks = 0
            if not self.output_active:
                self.output_active = True
                return self._event("output_audio_buffer.started", response_id=self.response_id)
        elif self.output_active:
            self.idle_ticks += 1
            # A short gap (the bridge a frame late) is not the end: without the hold-off a
            # bridge that streams audio with no response framing would flap started/stopped.
            if self._response_finished and self.idle_ticks >= STOPPED_AFTER_IDLE_TICKS:
                self.output_active = False
                self.idle_ticks = 0
                return self._event("output_audio_buffer.stopped", response_id=self.response_id)
        return None

    def ending(self, close_reason: int) -> str | None:
        """The last event of a session the server ends for `close_reason` (ENDINGS); None
        for reasons the caller is not told about this way."""
        known = ENDINGS.get(close_reason)
        if known is None:
            return None
        code, message = known
        error = {"type": "server_error", "code": code, "message": message, "param": None}
        return self._event("error", error=error)

    # ---- client events

    def _error(self, code: str, message: str, client_event_id: Any, param: str | None) -> str:
        error: dict[str, Any] = {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
        }
        if isinstance(client_event_id, str):
            error["event_id"] = client_event_id
        return self._event("error", error=error)

    def from_client(self, text: str) -> ClientOutcome:
        """One client event from the data channel or a sideband."""
        try:
            event: Any = json.loads(text)
        except ValueError:
            return ClientOutcome(
                reply=(self._error("invalid_json", "The event is not valid JSON.", None, None),)
            )
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return ClientOutcome(
                reply=(
                    self._error(
                        "invalid_event",
                        "An event must be a JSON object with a string 'type'.",
                        event.get("event_id") if isinstance(event, dict) else None,
                        "type",
                    ),
                )
            )
        kind = event["type"]
        if kind in ("response.cancel", "output_audio_buffer.clear"):
            self._client_cancelled = not self._response_finished
        if kind == "output_audio_buffer.clear":
            return ClientOutcome(to_bridge=text, clear_playout=True, broadcast=(self.cleared(),))
        if kind == "session.update":
            session = event.get("session")
            if not isinstance(session, dict):
                return ClientOutcome(
                    reply=(
                        self._error(
                            "invalid_value",
                            "session.update needs a 'session' object.",
                            event.get("event_id"),
                            "session",
                        ),
                    )
                )
            if session.get("type", "realtime") != "realtime":
                return ClientOutcome(
                    reply=(
                        self._error(
                            "invalid_value",
                            "Only realtime sessions are supported (session.type 'realtime').",
                            event.get("event_id"),
                            "session.type",
                        ),
                    )
                )
            if self.sends_session_events or not self._accepted:
                return ClientOutcome(to_bridge=text)
            self.session = merge_session(self.session, session)
            self.session["type"] = "realtime"
            updated = self._event("session.updated", session=self.session)
            return ClientOutcome(to_bridge=text, broadcast=(updated,))
        return ClientOutcome(to_bridge=text)
