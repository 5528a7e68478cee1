"""BatchedLink against a real gRPC bridge that misbehaves: a session the transceiver gives
up on (no answer in time, or an answer that is not session_accepted) is still ended at the
bridge, since a shared stream has no per-session cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest

from libs.wire.batches import BATCH_BYTES_MAX
from services.transceiver.bridge import BatchedBridge, BatchedLink, BridgeError
from services.transceiver.session import Session
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

Resp = inference_pb2.StreamSessionResponse


class OddBridge(inference_pb2_grpc.InferenceBridgeServiceServicer):
    """Answers session "odd" with an event instead of session_accepted, "mute" not at all;
    records every item it receives."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.changed = asyncio.Event()
        # The gRPC tasks running our handlers: awaited at teardown, so none outlives a test.
        self.rpc_tasks: set[asyncio.Task[Any]] = set()

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.rpc_tasks.add(task)

    async def StreamSession(  # type: ignore[override]  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "batched only")

    async def StreamSessions(  # type: ignore[override]  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self._track()
        async for batch in request_iterator:
            for item in batch.items:
                kind = str(item.request.WhichOneof("payload"))
                self.items.append((item.session_id, kind))
                self.changed.set()
                if kind == "session_start" and item.session_id == "odd":
                    event = inference_pb2.DataChannelMessage(json="{}")
                    response = inference_pb2.SessionResponseItem(
                        session_id="odd", response=Resp(data_channel_message=event)
                    )
                    await context.write(inference_pb2.StreamSessionsResponse(items=[response]))


async def wait_for_item(bridge: OddBridge, item: tuple[str, str]) -> None:
    async with asyncio.timeout(5):
        while item not in bridge.items:
            bridge.changed.clear()
            await bridge.changed.wait()


@contextlib.asynccontextmanager
async def batched_bridge(servicer: OddBridge) -> AsyncIterator[BatchedBridge]:
    """A BatchedBridge to `servicer` served by a real gRPC server on 127.0.0.1."""
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    batched = BatchedBridge(channel, f"127.0.0.1:{port}")
    try:
        yield batched
    finally:
        await batched.close()
        await channel.close(None)
        await server.stop(None)
        if servicer.rpc_tasks:  # cancelled by stop(); on a busy machine not yet finished
            await asyncio.wait(servicer.rpc_tasks, timeout=5)


@pytest.mark.timeout_s(30)
async def test_sessions_given_up_on_are_ended_at_the_bridge() -> None:
    bridge = OddBridge()
    async with batched_bridge(bridge) as batched:
        odd = BatchedLink(batched, "odd")
        with pytest.raises(BridgeError, match="expected session_accepted, got data_channel"):
            await odd.open(inference_pb2.SessionStart(session_id="odd"), 5)
        await wait_for_item(bridge, ("odd", "session_end"))

        mute = BatchedLink(batched, "mute")
        with pytest.raises(BridgeError, match="timed out"):
            await mute.open(inference_pb2.SessionStart(session_id="mute"), 0.3)
        await wait_for_item(bridge, ("mute", "session_end"))
        await mute.close(0, "", notify=True)  # already ended: nothing more is sent
        assert bridge.items.count(("mute", "session_end")) == 1


class AcceptingBridge(OddBridge):
    """Batched only, accepts every session; records the size of every batch and each audio
    frame's (session, sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_bytes: list[int] = []
        self.frames: list[tuple[str, int]] = []

    async def StreamSessions(  # type: ignore[override]  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self._track()
        async for batch in request_iterator:
            self.batch_bytes.append(batch.ByteSize())
            for item in batch.items:
                if item.request.WhichOneof("payload") == "session_start":
                    accepted = Resp(session_accepted=inference_pb2.SessionAccepted())
                    response = inference_pb2.SessionResponseItem(
                        session_id=item.session_id, response=accepted
                    )
                    await context.write(inference_pb2.StreamSessionsResponse(items=[response]))
                elif item.request.WhichOneof("payload") == "audio_frame":
                    self.frames.append((item.session_id, item.request.audio_frame.sequence))
            self.changed.set()


@pytest.mark.timeout_s(30)
async def test_a_large_backlog_goes_as_batches_under_the_message_limit() -> None:
    # 80 frames of 64 KiB queued in one loop turn: 5 MiB, over gRPC's default 4 MiB message
    # limit, which as one batch would end the stream (and every session on it).
    bridge = AcceptingBridge()
    async with batched_bridge(bridge) as batched:
        link = BatchedLink(batched, "big")
        await link.open(inference_pb2.SessionStart(session_id="big"), 5)
        frame = bytes(64 << 10)
        for _ in range(80):
            link.send_audio(frame, 960)
        async with asyncio.timeout(10):
            while len(bridge.frames) < 80:
                bridge.changed.clear()
                await bridge.changed.wait()
        assert bridge.frames == [("big", sequence) for sequence in range(80)]
        assert link.dropped_audio == 0
        audio_batches = bridge.batch_bytes[1:]  # after the one with session_start
        assert len(audio_batches) >= 5
        assert max(audio_batches) <= BATCH_BYTES_MAX + len(frame) + 64


class ClosedLink:
    """A bridge stream this side already closed: read_loop returns at once (the shared
    stream's BatchedLink after close)."""

    accepted = None

    def __init__(self) -> None:
        self.reads = 0

    async def read_loop(self, on_message: Any) -> None:
        self.reads += 1
        if self.reads > 3:  # the bug: a loop that never yields; end it for the assert
            raise BridgeError("read again after the close")


@pytest.mark.timeout_s(10)
async def test_a_session_stops_reading_a_bridge_stream_it_closed_itself() -> None:
    # Reading again returned at once, forever, without yielding: a transceiver spun at
    # 100 % CPU when a call hung up right after its bridge opened.
    link = ClosedLink()

    async def open_bridge() -> ClosedLink:
        return link

    session = SimpleNamespace(
        id="s1",
        params=SimpleNamespace(bridge_address="127.0.0.1:1"),
        _open_bridge=open_bridge,
        _replay_client_backlog=lambda: None,
        _on_bridge_message=lambda message: None,
    )
    await asyncio.wait_for(Session._run_bridge(session), 5)  # type: ignore[arg-type]
    assert link.reads == 1
