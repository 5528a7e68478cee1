"""InferenceBridgeService: one StreamSession per WebRTC session, run by a backend.

The servicer is thin: it checks the first message (protocol in inference.proto), admits the
session (capacity, duplicate id, draining), answers SessionAccepted, then pumps caller
messages into the backend and the backend's Outbox onto the response stream. Whatever way
the stream ends (SessionEnd from either side, half-close, client cancel, error) the reader
task and the backend are cancelled and awaited: no task outlives its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf import json_format

from libs.observability.telemetry import Telemetry, log_event
from libs.wire.batches import SizedBatches
from services.bridge.audio import FRAME_MS
from services.bridge.echo import EchoAgent
from services.bridge.session import Outbox, Response
from services.bridge.settings import BridgeSettings
from services.bridge.turns import TurnConfig
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

logger = logging.getLogger("voiceedge.bridge")

Request = inference_pb2.StreamSessionRequest


class BackendError(Exception):
    """The backend cannot serve the session (e.g. the realtime endpoint refused us)."""


class Backend(Protocol):
    """One session of a backend; the servicer calls start, then the on_* hooks, then close.

    `sends_session_events` and `session_defaults` go out in SessionAccepted (see
    inference.proto): whether the backend answers `session.update` itself, else the
    defaults the transceiver reports under the session's own configuration."""

    sends_session_events: bool
    session_defaults: Mapping[str, Any] | None

    async def start(self) -> None: ...

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None: ...

    async def on_data_channel(self, text: str) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SessionContext:
    """What a backend needs to know about a new session."""

    session_id: str
    input_rate_hz: int
    input_channels: int
    session_config: Mapping[str, Any]
    outbox: Outbox


BackendFactory = Callable[[SessionContext], Backend]


def negotiate_input(fmt: common_pb2.AudioFormat, default_rate_hz: int) -> tuple[int, int]:
    """SessionStart.input_format -> (sample rate, channels); ValueError says what is wrong."""
    if fmt.encoding not in (
        common_pb2.AUDIO_ENCODING_UNSPECIFIED,
        common_pb2.AUDIO_ENCODING_PCM_S16LE,
    ):
        raise ValueError(
            f"input_format.encoding {common_pb2.AudioEncoding.Name(fmt.encoding)} unsupported: "
            "the bridge takes PCM s16le"
        )
    rate = fmt.sample_rate_hz or default_rate_hz
    if not 8000 <= rate <= 48000:
        raise ValueError(f"input_format.sample_rate_hz {rate} unsupported: 8000 to 48000")
    channels = fmt.channels or 1
    if channels not in (1, 2):
        raise ValueError(f"input_format.channels {channels} unsupported: 1 or 2")
    return rate, channels


def make_backend_factory(settings: BridgeSettings) -> BackendFactory:
    """The backend chosen by `settings.backend`."""
    base_turns = TurnConfig(
        speech_start_ms=settings.speech_start_ms,
        end_of_turn_silence_ms=settings.end_of_turn_silence_ms,
        short_utterance_ms=settings.short_utterance_ms,
        short_utterance_extra_silence_ms=settings.short_utterance_extra_silence_ms,
    )

    def echo(ctx: SessionContext) -> Backend:
        return EchoAgent(
            ctx.session_id,
            outbox=ctx.outbox,
            input_rate_hz=ctx.input_rate_hz,
            input_channels=ctx.input_channels,
            output_rate_hz=settings.sample_rate_hz,
            turn_config=base_turns,
            session_config=ctx.session_config,
            vad_aggressiveness=settings.vad_aggressiveness,
            prefix_padding_ms=settings.prefix_padding_ms,
            max_utterance_s=settings.max_utterance_s,
            playout_lead_ms=settings.playout_lead_ms,
        )

    def realtime(ctx: SessionContext) -> Backend:
        # Imported here: aiohttp is only needed by sessions of this backend.
        from services.bridge.realtime import RealtimeAdapter

        return RealtimeAdapter(ctx, settings)

    return realtime if settings.backend == "realtime" else echo


def _accepted(
    output_format: common_pb2.AudioFormat, backend: Backend
) -> inference_pb2.SessionAccepted:
    accepted = inference_pb2.SessionAccepted(
        output_format=output_format,
        opus_passthrough=False,
        sends_session_events=backend.sends_session_events,
    )
    if backend.session_defaults:
        accepted.session_defaults.update(dict(backend.session_defaults))
    return accepted


# Caller messages queued per session on StreamSessions before audio is dropped (~5 s).
BATCHED_BACKLOG_MAX = 256


class _RefusedError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Refusal:
    """The one ServicerContext method StreamSession uses, for a session on StreamSessions:
    a refusal becomes that session's session_end instead of the stream's status."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _RefusedError(code, details)


async def _drain_queue(queue: asyncio.Queue[Request | None]) -> AsyncIterator[Request]:
    while (request := await queue.get()) is not None:
        yield request


class _Batch:
    """Responses of every session on one StreamSessions stream, waiting for the writer, in
    batches under libs/wire/batches' limit."""

    def __init__(self) -> None:
        self.batches: SizedBatches[list[inference_pb2.SessionResponseItem]] = SizedBatches(list)
        self.wake = asyncio.Event()
        self.reading = True

    def add(self, session_id: str, response: Response) -> None:
        item = inference_pb2.SessionResponseItem(session_id=session_id, response=response)
        self.batches.room(item.ByteSize()).append(item)
        self.wake.set()


class BridgeServicer(inference_pb2_grpc.InferenceBridgeServiceServicer):
    """StreamSession for every backend; `drain`/`close` are the service's lifecycle hooks."""

    def __init__(
        self,
        settings: BridgeSettings,
        telemetry: Telemetry | None = None,
        backend_factory: BackendFactory | None = None,
    ) -> None:
        self._settings = settings
        self._factory = backend_factory or make_backend_factory(settings)
        self._sessions: dict[str, Outbox] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self._draining = False
        self.batched_audio_dropped = 0
        self._output_format = common_pb2.AudioFormat(
            encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE,
            sample_rate_hz=settings.sample_rate_hz,
            channels=1,
            frame_duration_ms=FRAME_MS,
        )
        self._active = None
        self._opened = None
        if telemetry is not None:
            self._active = telemetry.meter.create_up_down_counter(
                "bridge.sessions.active", description="open StreamSession streams"
            )
            self._opened = telemetry.meter.create_counter(
                "bridge.sessions.opened", description="accepted StreamSession streams"
            )

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def StreamSession(  # noqa: N802  # the generated name; grpc.aio passes an async iterator
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext[Request, Response],
    ) -> AsyncIterator[Response]:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "stream ended before session_start"
            )
        if first.WhichOneof("payload") != "session_start":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"first message must be session_start, got {first.WhichOneof('payload')}",
            )
        start = first.session_start
        session_id = start.session_id
        if not session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_start.session_id empty")
        try:
            rate, channels = negotiate_input(start.input_format, self._settings.sample_rate_hz)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "bridge is draining")
        if session_id in self._sessions:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"session {session_id} already has a stream"
            )
        if len(self._sessions) >= self._settings.max_sessions:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"bridge at max_sessions={self._settings.max_sessions}",
            )
        config: dict[str, Any] = (
            json_format.MessageToDict(start.session_config)
            if start.HasField("session_config")
            else {}
        )
        outbox = Outbox(session_id)
        self._sessions[session_id] = outbox
        self._empty.clear()
        if self._active is not None and self._opened is not None:
            self._active.add(1)
            self._opened.add(1, {"backend": self._settings.backend})
        log_event(
            logger,
            "bridge.session_open",
            session__id=session_id,
            backend=self._settings.backend,
            input_rate_hz=rate,
            input_channels=channels,
        )
        backend = self._factory(SessionContext(session_id, rate, channels, config, outbox))
        reader: asyncio.Task[None] | None = None
        try:
            try:
                await backend.start()
            except BackendError as exc:
                log_event(
                    logger,
                    "bridge.backend_failed",
                    level=logging.WARNING,
                    session__id=session_id,
                    error=str(exc),
                )
                yield Response(
                    session_end=inference_pb2.SessionEnd(
                        reason=common_pb2.CLOSE_REASON_BRIDGE_ERROR, detail=str(exc)
                    )
                )
                return
            yield Response(session_accepted=_accepted(self._output_format, backend))
            reader = asyncio.create_task(
                self._read(session_id, request_iterator, backend, outbox), name="bridge-reader"
            )
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            await backend.close()
            del self._sessions[session_id]
            if not self._sessions:
                self._empty.set()
            if self._active is not None:
                self._active.add(-1)
            log_event(logger, "bridge.session_closed", session__id=session_id)

    async def StreamSessions(  # noqa: N802  # the generated name
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.StreamSessionsResponse]:
        """Every session of one transceiver on one stream, batched (inference.proto): each
        session runs through StreamSession exactly as on a stream of its own; what they
        answer in one event-loop turn goes back as one batch."""
        batch = _Batch()
        sessions: dict[str, asyncio.Queue[Request | None]] = {}
        tasks: set[asyncio.Task[None]] = set()

        async def run(session_id: str, requests: asyncio.Queue[Request | None]) -> None:
            try:
                async for response in self.StreamSession(_drain_queue(requests), _Refusal()):  # type: ignore[arg-type]
                    batch.add(session_id, response)
            except _RefusedError as exc:
                end = inference_pb2.SessionEnd(
                    reason=common_pb2.CLOSE_REASON_BRIDGE_ERROR,
                    detail=f"{exc.code.name}: {exc.details}",
                )
                batch.add(session_id, Response(session_end=end))
            finally:
                if sessions.get(session_id) is requests:
                    del sessions[session_id]
                current = asyncio.current_task()
                if current is not None:
                    tasks.discard(current)  # before the wake: the writer checks `tasks`
                batch.wake.set()

        async def read() -> None:
            try:
                async for incoming in request_iterator:
                    for item in incoming.items:
                        kind = item.request.WhichOneof("payload")
                        queue = sessions.get(item.session_id)
                        if queue is None:
                            if kind != "session_start":
                                continue  # a message for a session that has ended: dropped
                            queue = sessions[item.session_id] = asyncio.Queue()
                            # run() takes itself out of `tasks` when it ends.
                            tasks.add(asyncio.create_task(run(item.session_id, queue)))
                        if queue.qsize() >= BATCHED_BACKLOG_MAX and kind == "audio_frame":
                            # No per-session flow control on a shared stream: a backend this
                            # far behind loses caller audio (counted) rather than memory.
                            self.batched_audio_dropped += 1
                            continue
                        queue.put_nowait(item.request)
                        if kind == "session_end":
                            queue.put_nowait(None)
                            del sessions[item.session_id]
            except grpc.aio.AioRpcError:
                pass
            finally:
                for queue in sessions.values():
                    queue.put_nowait(None)  # the stream ended: so does every session on it
                batch.reading = False
                batch.wake.set()

        reader = asyncio.create_task(read())
        try:
            while batch.reading or tasks or batch.batches.items:
                await batch.wake.wait()
                batch.wake.clear()
                while (items := batch.batches.take()) is not None:
                    yield inference_pb2.StreamSessionsResponse(items=items)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read(
        self,
        session_id: str,
        requests: AsyncIterator[Request],
        backend: Backend,
        outbox: Outbox,
    ) -> None:
        """Caller messages -> backend. Ends the outbox when the caller ends the session."""
        try:
            async for request in requests:
                kind = request.WhichOneof("payload")
                if kind == "audio_frame":
                    await backend.on_audio(request.audio_frame)
                elif kind == "data_channel_message":
                    await backend.on_data_channel(request.data_channel_message.json)
                elif kind == "session_end":
                    log_event(
                        logger,
                        "bridge.client_session_end",
                        session__id=session_id,
                        reason=common_pb2.CloseReason.Name(request.session_end.reason),
                    )
                    break
                else:
                    log_event(
                        logger,
                        "bridge.unexpected_message",
                        level=logging.WARNING,
                        session__id=session_id,
                        payload=kind,
                    )
        except BackendError as exc:
            outbox.end(common_pb2.CLOSE_REASON_BRIDGE_ERROR, str(exc))
            return
        except grpc.aio.AioRpcError:
            pass  # the stream broke; the handler is being cancelled too
        except Exception:  # a bug in a backend ends its session, never the process
            logger.exception("bridge.backend_crashed", extra={"kv": {"session.id": session_id}})
            outbox.end(common_pb2.CLOSE_REASON_INTERNAL_ERROR, "internal error in the bridge")
            return
        outbox.close()

    async def wait_idle(self) -> None:
        """Until no session is open (each stream's cleanup has finished)."""
        await self._empty.wait()

    async def drain(self, grace_s: float) -> None:
        """Refuses new sessions and waits until open ones end (the runtime bounds the wait)."""
        self._draining = True
        await self._empty.wait()

    async def close(self) -> None:
        """Ends every open session with CLOSE_REASON_DRAINED."""
        self._draining = True
        for outbox in list(self._sessions.values()):
            outbox.end(common_pb2.CLOSE_REASON_DRAINED, "bridge shutting down")
