"""The transceiver's end of InferenceBridgeService: a session's stream to its bridge, one
StreamSession per session or its share of a batched StreamSessions stream, both behind
`BridgeSession` and opened by `open_bridge_session` as the settings choose.

StreamSession: one writer task serialises writes (grpc.aio allows one pending write); a
bounded outbox drops caller audio rather than growing when the bridge is slow. The reader
hands every bridge message to the session's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import grpc.aio

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from libs.service.auth import internal_channel
from libs.wire.batches import RequestBatches, session_responses
from services.transceiver.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

OUTBOX_MAX = 256  # about 5 s of 20 ms frames

# gRPC's reconnect backoff grows to 120 s by default: a bridge back after a restart would
# then wait that long for new calls and reconnecting sessions. Capped at 0.5 s.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 500),
)

logger = logging.getLogger("voiceedge.transceiver.session")


class BridgeError(Exception):
    """The bridge refused the session or the stream broke."""


class BridgeEndedError(Exception):
    """The bridge ended the session normally (SessionEnd or half-close); `after_playout`:
    once the queued response audio has played (SessionEnd.after_playout)."""

    def __init__(self, detail: str, *, after_playout: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.after_playout = after_playout

    @classmethod
    def of(cls, end: inference_pb2.SessionEnd) -> BridgeEndedError:
        return cls(end.detail or "session_end from bridge", after_playout=end.after_playout)


Request = inference_pb2.StreamSessionRequest
Response = inference_pb2.StreamSessionResponse


class AudioNumbering:
    """Caller frames numbered as inference.proto says: `sequence` +1 per frame and
    `timestamp_samples` from the stream's start; skip_audio() leaves the gap that tells the
    bridge frames were lost."""

    def __init__(self) -> None:
        self.audio_sequence = 0
        self.audio_samples = 0

    def _number(self, samples: int) -> tuple[int, int]:
        """(sequence, timestamp_samples) of the next frame, which holds `samples`."""
        sequence, offset = self.audio_sequence, self.audio_samples
        self.audio_sequence = sequence + 1
        self.audio_samples = offset + samples
        return sequence, offset

    def _next_frame(self, data: bytes, samples: int) -> inference_pb2.AudioFrame:
        sequence, offset = self._number(samples)
        return inference_pb2.AudioFrame(data=data, sequence=sequence, timestamp_samples=offset)

    def skip_audio(self, frames: int, samples_per_frame: int) -> None:
        self.audio_sequence += frames
        self.audio_samples += frames * samples_per_frame


class BridgeLink(AudioNumbering):
    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        super().__init__()
        self.address = address
        # grpc-stubs type the generated stub as synchronous; on an aio channel it is not.
        self._stub: Any = inference_pb2_grpc.InferenceBridgeServiceStub(channel)
        self._call: Any = None
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue(OUTBOX_MAX)
        self._writer: asyncio.Task[None] | None = None
        self.accepted: inference_pb2.SessionAccepted | None = None
        self.dropped_audio = 0
        self._ended = False

    async def open(self, start: inference_pb2.SessionStart, timeout_s: float) -> None:
        """Sends SessionStart and waits for SessionAccepted (stream protocol steps 1-2)."""
        self._call = self._stub.StreamSession()
        try:
            await asyncio.wait_for(self._call.write(Request(session_start=start)), timeout_s)
            first = await asyncio.wait_for(self._call.read(), timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise BridgeError(f"bridge {self.address}: {_describe(exc)}") from None
        if not isinstance(first, Response):  # grpc.aio.EOF
            raise BridgeError(f"bridge {self.address}: stream ended before SessionAccepted")
        if first.WhichOneof("payload") != "session_accepted":
            raise BridgeError(
                f"bridge {self.address}: expected session_accepted, got "
                f"{first.WhichOneof('payload')}"
            )
        self.accepted = first.session_accepted
        self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        assert self._call is not None
        while True:
            item = await self._outbox.get()
            if item is None:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
                return
            try:
                await self._call.write(item)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return

    async def read_loop(self, on_message: Callable[[Response], None]) -> None:
        """Dispatches bridge messages until it ends; raises BridgeEnded or BridgeError."""
        assert self._call is not None
        while True:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise BridgeError(f"bridge {self.address}: {_describe(exc)}") from None
            if not isinstance(message, Response):  # grpc.aio.EOF
                raise BridgeEndedError("bridge half-closed the stream")
            if message.WhichOneof("payload") == "session_end":
                raise BridgeEndedError.of(message.session_end)
            on_message(message)

    def _put(self, request: Request) -> bool:
        if self._ended or self._writer is None:
            return False
        try:
            self._outbox.put_nowait(request)
        except asyncio.QueueFull:
            return False
        return True

    def send_audio(self, data: bytes, samples: int) -> None:
        frame = self._next_frame(data, samples)
        if not self._put(Request(audio_frame=frame)):
            self.dropped_audio += 1

    def send_event(self, text: str) -> None:
        self._put(Request(data_channel_message=inference_pb2.DataChannelMessage(json=text)))

    def send_report(self, report: inference_pb2.PlayoutReport) -> None:
        self._put(Request(playout_report=report))

    async def close(self, reason: int, detail: str, *, notify: bool) -> None:
        """Ends the stream: SessionEnd (unless the bridge ended it), half-close, then cancel
        whatever is still pending. Idempotent."""
        if self._ended:
            return
        if notify and self._writer is not None:
            end = inference_pb2.SessionEnd(reason=reason, detail=detail)  # type: ignore[arg-type]
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(Request(session_end=end))
        self._ended = True
        if self._writer is not None:
            if notify:
                with contextlib.suppress(asyncio.QueueFull):
                    self._outbox.put_nowait(None)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
            await cancel_and_wait(self._writer)
        if self._call is not None:
            self._call.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return repr(exc)


def opus_format() -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_OPUS,
        sample_rate_hz=48000,
        channels=2,
        frame_duration_ms=20,
    )


def pcm_format(rate_hz: int) -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE,
        sample_rate_hz=rate_hz,
        channels=1,
        frame_duration_ms=20,
    )


# ---- StreamSessions: every session to one bridge on one stream, batched


class BatchingUnsupportedError(BridgeError):
    """The bridge answered StreamSessions with UNIMPLEMENTED: use StreamSession."""


class BatchedBridge:
    """One StreamSessions stream to one bridge address, shared by the sessions using it.

    Messages queued during one event-loop turn (and while a write is in flight) go out as
    one batch, built in place (audio frames are written straight into the next batch's
    items: no per-frame messages copied into it), several past libs/wire/batches' limit;
    each received batch is dispatched to the sessions' callbacks directly, with no task
    switch per message. The stream opens with the first session and is reopened by the
    next one after it broke."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self._stub: Any = inference_pb2_grpc.InferenceBridgeServiceStub(channel)
        self._call: Any = None
        self._links: dict[str, BatchedLink] = {}
        self._batches = RequestBatches()
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()  # set while nothing is pending or being written
        self._flushed.set()
        self._tasks: list[asyncio.Task[None]] = []
        self.unimplemented = False
        self.batches_out = 0
        self.batches_in = 0

    def _ensure_stream(self) -> None:
        if self._call is not None:
            return
        self._call = self._stub.StreamSessions()
        self._tasks = [
            asyncio.create_task(self._write_loop(self._call)),
            asyncio.create_task(self._read_loop(self._call)),
        ]

    def attach(self, link: BatchedLink) -> None:
        if link.session_id in self._links:
            raise BridgeError(f"bridge {self.address}: session {link.session_id} already open")
        self._links[link.session_id] = link
        self._ensure_stream()

    def detach(self, link: BatchedLink) -> None:
        if self._links.get(link.session_id) is link:
            del self._links[link.session_id]

    def _queued(self) -> None:
        """After an item was queued: the first one since the last write wakes the writer."""
        if self._batches.items == 1:
            self._flushed.clear()
            self._wake.set()

    def enqueue(self, session_id: str, request: Request) -> None:
        """Queues one message (not audio: enqueue_audio)."""
        self._batches.add(session_id, request)
        self._queued()

    def enqueue_audio(self, session_id: str, data: bytes, sequence: int, samples: int) -> bool:
        """Queues one caller audio frame; refused (False) beyond OUTBOX_MAX per session."""
        if self._batches.items >= OUTBOX_MAX * max(1, len(self._links)):
            return False
        self._batches.add_audio(session_id, data, sequence, samples)
        self._queued()
        return True

    async def _write_loop(self, call: Any) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while (batch := self._batches.take()) is not None:
                    await call.write(batch)
                    self.batches_out += 1
                self._flushed.set()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the reader sees the same failure and ends the sessions
        finally:
            self._flushed.set()

    async def _read_loop(self, call: Any) -> None:
        detail = "bridge ended the StreamSessions stream"
        unimplemented = False
        try:
            while True:
                batch = await call.read()
                if not isinstance(batch, inference_pb2.StreamSessionsResponse):  # EOF
                    break
                self.batches_in += 1
                self._dispatch(batch)
        except grpc.aio.AioRpcError as exc:
            unimplemented = exc.code() == grpc.StatusCode.UNIMPLEMENTED
            detail = f"bridge {self.address}: {_describe(exc)}"
        if call is self._call:
            self._call = None
            self._batches.clear()
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
        self.unimplemented = self.unimplemented or unimplemented
        for link in list(self._links.values()):
            link.broken(detail, unimplemented=unimplemented)

    def _dispatch(self, batch: inference_pb2.StreamSessionsResponse) -> None:
        # A method of its own: a loop variable in the long-lived reader would keep the last
        # session it delivered to alive after that session closed.
        for session_id, response in session_responses(batch):
            link = self._links.get(session_id)
            if link is not None:
                link.deliver(response)

    async def close(self, flush_timeout_s: float = 1.0) -> None:
        """Ends the stream and its tasks (the transceiver is shutting down): what is queued
        (the sessions' SessionEnd) goes out first, for up to `flush_timeout_s`."""
        if self._call is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), flush_timeout_s)
        call = self._call
        if call is not None:
            # Half-close, then let the bridge finish the stream (the reader ends at its EOF):
            # cancelling at once could drop the SessionEnds it has not read yet.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                await asyncio.wait_for(call.done_writing(), flush_timeout_s)
                reader = self._tasks[-1] if self._tasks else None
                if reader is not None:
                    await asyncio.wait_for(asyncio.shield(reader), flush_timeout_s)
            self._call = None
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


class BatchedLink(AudioNumbering):
    """BridgeLink's interface for one session on a BatchedBridge."""

    def __init__(self, bridge: BatchedBridge, session_id: str) -> None:
        super().__init__()
        self.address = bridge.address
        self.session_id = session_id
        self._bridge = bridge
        self.accepted: inference_pb2.SessionAccepted | None = None
        self.dropped_audio = 0
        self._ended = False
        self._opened: asyncio.Future[Response] | None = None
        self._finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_message: Callable[[Response], None] | None = None
        self._early: list[Response] = []

    async def open(self, start: inference_pb2.SessionStart, timeout_s: float) -> None:
        self._opened = asyncio.get_running_loop().create_future()
        self._bridge.attach(self)
        self._bridge.enqueue(self.session_id, Request(session_start=start))
        try:
            first = await asyncio.wait_for(asyncio.shield(self._opened), timeout_s)
        except TimeoutError:
            self._opened.cancel()
            # The bridge may still accept later; end the session there either way.
            self._abandon("timed out waiting for session_accepted")
            raise BridgeError(f"bridge {self.address}: timed out") from None
        except BridgeError:
            self._bridge.detach(self)
            raise
        kind = first.WhichOneof("payload")
        if kind == "session_end":
            self._bridge.detach(self)
            raise BridgeError(
                f"bridge {self.address}: refused: {first.session_end.detail or 'session_end'}"
            )
        if kind != "session_accepted":
            self._abandon(f"expected session_accepted, got {kind}")
            raise BridgeError(f"bridge {self.address}: expected session_accepted, got {kind}")
        self.accepted = first.session_accepted

    def _abandon(self, detail: str) -> None:
        """Gives up on a session the bridge may hold open: SessionEnd, then forget it."""
        self._bridge.detach(self)
        end = inference_pb2.SessionEnd(reason=common_pb2.CLOSE_REASON_BRIDGE_ERROR, detail=detail)
        self._bridge.enqueue(self.session_id, Request(session_end=end))
        self._ended = True

    def deliver(self, message: Response) -> None:
        """A message for this session from the shared reader."""
        on_message = self._on_message
        if on_message is not None and not self._finished.done():  # streaming: most calls
            if message.WhichOneof("payload") == "session_end":
                self._finish(BridgeEndedError.of(message.session_end))
            else:
                on_message(message)
            return
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(message)
            return
        if self._finished.done():
            return
        if message.WhichOneof("payload") == "session_end":
            self._finish(BridgeEndedError.of(message.session_end))
            return
        if self._on_message is None:
            self._early.append(message)
        else:
            self._on_message(message)

    def broken(self, detail: str, *, unimplemented: bool) -> None:
        error: BridgeError = (
            BatchingUnsupportedError(detail) if unimplemented else BridgeError(detail)
        )
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error)
            return
        self._finish(error)

    def _finish(self, error: Exception) -> None:
        if not self._finished.done():
            self._finished.set_exception(error)
        self._bridge.detach(self)

    async def read_loop(self, on_message: Callable[[Response], None]) -> None:
        """Hands this session's messages to `on_message` until it ends; raises like
        BridgeLink.read_loop."""
        self._on_message = on_message
        early, self._early = self._early, []
        for message in early:
            on_message(message)
        await self._finished

    def send_audio(self, data: bytes, samples: int) -> None:
        sequence, offset = self._number(samples)
        if self._ended or not self._bridge.enqueue_audio(self.session_id, data, sequence, offset):
            self.dropped_audio += 1

    def send_event(self, text: str) -> None:
        if not self._ended:
            message = inference_pb2.DataChannelMessage(json=text)
            self._bridge.enqueue(self.session_id, Request(data_channel_message=message))

    def send_report(self, report: inference_pb2.PlayoutReport) -> None:
        if not self._ended:
            self._bridge.enqueue(self.session_id, Request(playout_report=report))

    async def close(self, reason: int, detail: str, *, notify: bool) -> None:
        """SessionEnd to the bridge (unless it ended the session), then forget the session.
        Idempotent."""
        if self._ended:
            return
        self._ended = True
        if notify and self._opened is not None:
            # Also while the bridge's answer is still on its way: on a shared stream there
            # is no per-session cancel, and a session started must be ended.
            end = inference_pb2.SessionEnd(reason=reason, detail=detail)  # type: ignore[arg-type]
            self._bridge.enqueue(self.session_id, Request(session_end=end))
        self._bridge.detach(self)
        if not self._finished.done():
            self._finished.set_result(None)
        elif not self._finished.cancelled():
            self._finished.exception()  # retrieved: it was raised to read_loop already


# ---- what a session holds: one BridgeSession, opened by open_bridge_session


class BridgeSession(Protocol):
    """One session's stream to its bridge, whichever RPC carries it (BridgeLink: its own
    StreamSession; BatchedLink: its share of a StreamSessions stream)."""

    address: str
    accepted: inference_pb2.SessionAccepted | None  # set once open() returned

    async def open(self, start: inference_pb2.SessionStart, timeout_s: float) -> None:
        """Sends SessionStart and waits for SessionAccepted; raises BridgeError."""

    async def read_loop(self, on_message: Callable[[Response], None]) -> None:
        """Hands the bridge's messages to `on_message` until the stream ends; raises
        BridgeEndedError (the bridge ended the session) or BridgeError."""

    def send_audio(self, data: bytes, samples: int) -> None:
        """The next caller audio frame (dropped and counted when the bridge lags)."""

    def skip_audio(self, frames: int, samples_per_frame: int) -> None:
        """Frames that were lost: a gap in AudioFrame.sequence and timestamp_samples."""

    def send_event(self, text: str) -> None:
        """A client event for the bridge (DataChannelMessage)."""

    def send_report(self, report: inference_pb2.PlayoutReport) -> None:
        """What the caller heard of the response a clear interrupted (PlayoutReport)."""

    async def close(self, reason: int, detail: str, *, notify: bool) -> None:
        """Ends the stream, telling the bridge `reason` unless `notify` is False (the
        bridge ended it). Idempotent."""


_SETTLING = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


class BridgeStreams:
    """The transceiver's connections to its bridges: one gRPC channel and one shared
    StreamSessions stream per bridge address, made on first use, closed at shutdown."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._batched: dict[str, BatchedBridge] = {}

    def channel_for(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = internal_channel(address, CHANNEL_OPTIONS)
        return channel

    async def reachable(self, address: str, timeout_s: float) -> bool:
        """False when gRPC cannot connect to `address` (its channel in TRANSIENT_FAILURE);
        an idle or connecting channel is given up to `timeout_s` to settle, and counts as
        reachable if it has not failed by then."""
        channel = self.channel_for(address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        state = channel.get_state(try_to_connect=True)
        while state in _SETTLING and (remaining := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
            state = channel.get_state(try_to_connect=True)
        return state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def failing(self, address: str) -> bool:
        """True while gRPC's last attempt to connect to `address` failed; asking starts an
        attempt when the channel is idle (what the heartbeat reports, without waiting)."""
        state = self.channel_for(address).get_state(try_to_connect=True)
        return state is grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def batched_for(self, address: str) -> BatchedBridge:
        """The shared StreamSessions stream to `address` (opened by its first session)."""
        batched = self._batched.get(address)
        if batched is None:
            batched = self._batched[address] = BatchedBridge(self.channel_for(address), address)
        return batched

    async def close(self) -> None:
        """After the sessions closed: their SessionEnds go out, then every stream and
        channel ends."""
        for batched in self._batched.values():
            await batched.close()
        self._batched.clear()
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()


async def open_bridge_session(
    streams: BridgeStreams,
    settings: BridgeSettings,
    address: str,
    start: inference_pb2.SessionStart,
    hold: Callable[[BridgeSession], None],
) -> BridgeSession:
    """Opens the stream of session `start.session_id` to the bridge at `address`: its share
    of the bridge's StreamSessions stream with `bridge_batching` (unless that bridge has
    answered UNIMPLEMENTED, before or now), else a StreamSession of its own. `hold` gets
    each stream before it opens, so a session that closes meanwhile can end it at the
    bridge. Raises BridgeError."""
    timeout_s = settings.bridge_open_timeout_s
    if settings.bridge_batching:
        batched = streams.batched_for(address)
        if not batched.unimplemented:
            shared = BatchedLink(batched, start.session_id)
            hold(shared)
            try:
                await shared.open(start, timeout_s)
            except BatchingUnsupportedError:
                log_event(logger, "session.bridge_unbatched", session__id=start.session_id)
            else:
                return shared
    single = BridgeLink(streams.channel_for(address), address)
    hold(single)
    await single.open(start, timeout_s)
    return single
