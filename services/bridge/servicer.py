"""InferenceBridgeService: one session per WebRTC session, run by a backend.

The servicer is thin. Both RPCs run each session the same way: `_admit` checks the first
message (protocol in inference.proto) and admits the session (capacity, duplicate id,
draining) or refuses it with a status; `_session` answers SessionAccepted, then pumps the
caller's messages into the backend and the backend's Outbox out. StreamSession gives a
session a stream of its own (a refusal is the stream's status); StreamSessions carries every
session of a transceiver on one stream in batches (libs/wire/batches.py; a refusal is that
session's session_end). Whatever way a session ends (SessionEnd from either side,
half-close, client cancel, error) its reader task and backend are cancelled and awaited: no
task outlives its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from libs.observability.metrics import BRIDGE_SESSIONS_ACTIVE, BRIDGE_SESSIONS_OPENED
from libs.observability.telemetry import Telemetry, log_event
from libs.service.aio import cancel_and_wait
from libs.service.errors import StatusError, invalid_argument, resource_exhausted
from libs.wire.batches import ResponseBatches, refusal, session_requests
from services.bridge.audio import FRAME_MS
from services.bridge.backend import (
    Backend,
    BackendError,
    BackendFactory,
    PlayoutListener,
    SessionContext,
)
from services.bridge.registry import FACTORIES
from services.bridge.session import Outbox, Response
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

logger = logging.getLogger("voiceedge.bridge")

Request = inference_pb2.StreamSessionRequest


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


async def _drain_queue(queue: asyncio.Queue[Request | None]) -> AsyncIterator[Request]:
    while (request := await queue.get()) is not None:
        yield request


class BridgeServicer(inference_pb2_grpc.InferenceBridgeServiceServicer):
    """Both RPCs for every backend; `drain`/`close` are the service's lifecycle hooks."""

    def __init__(
        self,
        settings: BridgeSettings,
        telemetry: Telemetry | None = None,
        backend_factory: BackendFactory | None = None,
    ) -> None:
        self._settings = settings
        self._factory = backend_factory or FACTORIES[settings.backend]
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
            self._active = BRIDGE_SESSIONS_ACTIVE.create(telemetry.meter)
            self._opened = BRIDGE_SESSIONS_OPENED.create(telemetry.meter)
            # Exported as 0 from the start, not only after the first session.
            self._active.add(0)
            self._opened.add(0)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def StreamSession(  # noqa: N802  # the generated name; grpc.aio passes an async iterator
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext[Request, Response],
    ) -> AsyncIterator[Response]:
        requests = aiter(request_iterator)
        # A refusal is a StatusError: the server's interceptor ends the stream with it.
        ctx = self._admit(await anext(requests, None))
        # aclosing: a stream the client abandons ends the session here and now.
        async with contextlib.aclosing(self._session(ctx, requests)) as responses:
            async for response in responses:
                yield response

    async def StreamSessions(  # noqa: N802  # the generated name
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.StreamSessionsResponse]:
        """Every session of one transceiver on one stream, batched (inference.proto): each
        session is admitted and run exactly as on a stream of its own; what they answer in
        one event-loop turn goes back as one batch."""
        out = ResponseBatches()
        wake = asyncio.Event()
        reading = True
        sessions: dict[str, asyncio.Queue[Request | None]] = {}
        tasks: set[asyncio.Task[None]] = set()

        def send(session_id: str, response: Response) -> None:
            out.add(session_id, response)
            wake.set()

        async def run(
            session_id: str, first: Request, requests: asyncio.Queue[Request | None]
        ) -> None:
            try:
                try:
                    ctx = self._admit(first)
                except StatusError as exc:
                    send(session_id, refusal(exc.grpc_code.name, exc.message))
                    return
                async for response in self._session(ctx, _drain_queue(requests)):
                    send(session_id, response)
            finally:
                if sessions.get(session_id) is requests:
                    del sessions[session_id]
                current = asyncio.current_task()
                if current is not None:
                    tasks.discard(current)  # before the wake: the writer checks `tasks`
                wake.set()

        async def read() -> None:
            nonlocal reading
            try:
                async for incoming in request_iterator:
                    for session_id, request in session_requests(incoming):
                        kind = request.WhichOneof("payload")
                        queue = sessions.get(session_id)
                        if queue is None:
                            if kind != "session_start":
                                continue  # a message for a session that has ended: dropped
                            queue = sessions[session_id] = asyncio.Queue()
                            # run() takes itself out of `tasks` when it ends.
                            tasks.add(asyncio.create_task(run(session_id, request, queue)))
                            continue
                        if queue.qsize() >= BATCHED_BACKLOG_MAX and kind == "audio_frame":
                            # No per-session flow control on a shared stream: a backend this
                            # far behind loses caller audio (counted) rather than memory.
                            self.batched_audio_dropped += 1
                            continue
                        queue.put_nowait(request)
                        if kind == "session_end":
                            queue.put_nowait(None)
                            del sessions[session_id]
            except grpc.aio.AioRpcError:
                pass
            finally:
                for queue in sessions.values():
                    queue.put_nowait(None)  # the stream ended: so does every session on it
                reading = False
                wake.set()

        reader = asyncio.create_task(read())
        try:
            while reading or tasks or out.items:
                await wake.wait()
                wake.clear()
                while (batch := out.take()) is not None:
                    yield batch
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    def _admit(self, first: Request | None) -> SessionContext:
        """Checks a session's first message and takes the session in (its outbox counted
        against max_sessions), or raises the StatusError that refuses it. The
        caller runs `_session` on the context at once: that is what lets the session go."""
        if first is None:
            raise invalid_argument("no_session_start", "stream ended before session_start")
        if first.WhichOneof("payload") != "session_start":
            raise invalid_argument(
                "no_session_start",
                f"first message must be session_start, got {first.WhichOneof('payload')}",
            )
        start = first.session_start
        session_id = start.session_id
        if not session_id:
            raise invalid_argument("no_session_id", "session_start.session_id empty")
        try:
            rate, channels = negotiate_input(start.input_format, self._settings.sample_rate_hz)
        except ValueError as exc:
            raise invalid_argument("unsupported_audio_format", str(exc)) from None
        if self._draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "draining", "bridge is draining")
        if session_id in self._sessions:
            raise StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                "session_exists",
                f"session {session_id} already has a stream",
            )
        if len(self._sessions) >= self._settings.max_sessions:
            raise resource_exhausted(
                "capacity", f"bridge at max_sessions={self._settings.max_sessions}"
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
        return SessionContext(session_id, rate, channels, config, outbox)

    async def _session(
        self, ctx: SessionContext, requests: AsyncIterator[Request]
    ) -> AsyncGenerator[Response, None]:
        """An admitted session, run by a new backend: SessionAccepted (or the session_end of
        a backend that failed to start), then the backend's messages until its outbox
        closes. However it ends, the reader and the backend are stopped and the session
        let go."""
        session_id = ctx.session_id
        backend: Backend | None = None
        reader: asyncio.Task[None] | None = None
        try:
            backend = self._factory(ctx, self._settings)
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
                self._read(session_id, requests, backend, ctx.outbox), name="bridge-reader"
            )
            while (message := await ctx.outbox.get()) is not None:
                yield message
        finally:
            # Each step runs even when the one before raises (a cancellation of this
            # stream included, which then goes on up): the session always unregisters.
            try:
                await cancel_and_wait(reader)
            finally:
                try:
                    if backend is not None:
                        await backend.close()
                finally:
                    del self._sessions[session_id]
                    if not self._sessions:
                        self._empty.set()
            if self._active is not None:
                self._active.add(-1)
            log_event(logger, "bridge.session_closed", session__id=session_id)

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
                elif kind == "playout_report":
                    if isinstance(backend, PlayoutListener):
                        await backend.on_playout_report(request.playout_report)
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
