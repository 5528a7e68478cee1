"""StreamSessions (every session of a transceiver on one batched stream) over real gRPC:
sessions open and end independently, refusals become that session's session_end, and the
stream's end ends every session on it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
import pytest

from libs.wire.batches import BATCH_BYTES_MAX, ResponseBatches
from services.bridge.bridge_testing import serve, session_start
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

Item = inference_pb2.SessionRequestItem


def batch(*items: tuple[str, inference_pb2.StreamSessionRequest]) -> Any:
    return inference_pb2.StreamSessionsRequest(
        items=[Item(session_id=sid, request=request) for sid, request in items]
    )


def end(reason: int = common_pb2.CLOSE_REASON_CLIENT_HANGUP) -> Any:
    return inference_pb2.StreamSessionRequest(
        session_end=inference_pb2.SessionEnd(reason=reason)  # type: ignore[arg-type]
    )


async def responses(call: Any, count: int) -> list[tuple[str, str]]:
    """(session id, payload kind) of the next `count` items, across batches."""
    out: list[tuple[str, str]] = []
    async with asyncio.timeout(10):
        while len(out) < count:
            message = await call.read()
            assert isinstance(message, inference_pb2.StreamSessionsResponse), "stream ended"
            out += [(i.session_id, str(i.response.WhichOneof("payload"))) for i in message.items]
    return out


@pytest.mark.timeout_s(30)
async def test_sessions_share_one_stream_and_end_independently() -> None:
    servicer = BridgeServicer(BridgeSettings(max_sessions=2))
    async with serve(servicer) as stub:
        call = stub.StreamSessions(None)
        await call.write(batch(("a", session_start("a")), ("b", session_start("b"))))
        assert sorted(await responses(call, 2)) == [
            ("a", "session_accepted"),
            ("b", "session_accepted"),
        ]
        assert servicer.session_count == 2
        # Capacity and duplicates are refused per session, on the same stream or another.
        await call.write(batch(("c", session_start("c"))))
        ((sid, kind),) = await responses(call, 1)
        assert (sid, kind) == ("c", "session_end")
        other = stub.StreamSessions(None)
        await other.write(batch(("a", session_start("a"))))
        message = await other.read()
        assert isinstance(message, inference_pb2.StreamSessionsResponse)
        (item,) = message.items
        assert item.response.session_end.reason == common_pb2.CLOSE_REASON_BRIDGE_ERROR
        assert item.response.session_end.detail.startswith("ALREADY_EXISTS: ")
        await other.done_writing()
        # One session ends; the other runs on.
        await call.write(batch(("a", end())))
        for _ in range(500):  # polls in-memory state: at most 500 x 10 ms
            if servicer.session_count == 1:
                break
            await asyncio.sleep(0.01)
        assert servicer.session_count == 1
        # Half-closing the stream ends every session on it, then the stream itself.
        await call.done_writing()
        async with asyncio.timeout(5):
            await servicer.wait_idle()
            while isinstance(await call.read(), inference_pb2.StreamSessionsResponse):
                pass
        assert await call.code() == grpc.StatusCode.OK
        assert servicer.session_count == 0


@pytest.mark.timeout_s(30)
async def test_refusal_detail_names_the_status() -> None:
    servicer = BridgeServicer(BridgeSettings())
    async with serve(servicer) as stub:
        call = stub.StreamSessions(None)
        opus = session_start("o", encoding=common_pb2.AUDIO_ENCODING_OPUS)
        await call.write(batch(("o", opus), ("n", end())))  # "n" never started: dropped
        message = await call.read()
        assert isinstance(message, inference_pb2.StreamSessionsResponse)
        (item,) = message.items
        assert item.session_id == "o"
        assert item.response.session_end.detail.startswith("INVALID_ARGUMENT: ")
        assert "AUDIO_ENCODING_OPUS" in item.response.session_end.detail
        await call.done_writing()
        await servicer.wait_idle()


class StuckBackend:
    """Takes the first frame and holds on_audio until released."""

    sends_session_events = False
    session_defaults: Mapping[str, Any] | None = None

    def __init__(self, release: asyncio.Event, entered: asyncio.Event) -> None:
        self.release = release
        self.entered = entered
        self.frames = 0

    async def start(self) -> None:
        pass

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        self.frames += 1
        self.entered.set()
        await self.release.wait()

    async def on_data_channel(self, text: str) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.timeout_s(30)
async def test_a_stuck_backend_loses_audio_not_memory() -> None:
    from services.bridge.bridge_testing import audio_requests, tone
    from services.bridge.servicer import BATCHED_BACKLOG_MAX

    release, entered = asyncio.Event(), asyncio.Event()
    backend = StuckBackend(release, entered)
    servicer = BridgeServicer(BridgeSettings(), backend_factory=lambda ctx, settings: backend)
    async with serve(servicer) as stub:
        call = stub.StreamSessions(None)
        await call.write(batch(("s", session_start("s"))))
        assert await responses(call, 1) == [("s", "session_accepted")]
        frames = audio_requests(tone(440, 0.02 * (BATCHED_BACKLOG_MAX + 100)))
        await call.write(batch(("s", frames[0])))
        await entered.wait()  # the backend now holds frame 0
        await call.write(batch(*(("s", f) for f in frames[1:])))
        await call.write(batch(("s", end())))  # control messages are never dropped
        for _ in range(500):  # polls in-memory state: at most 500 x 10 ms
            if servicer.batched_audio_dropped >= 99:
                break
            await asyncio.sleep(0.01)
        assert servicer.batched_audio_dropped == len(frames) - 1 - BATCHED_BACKLOG_MAX
        release.set()
        async with asyncio.timeout(10):
            await servicer.wait_idle()  # the session_end behind the backlog still ended it
        assert backend.frames == 1 + BATCHED_BACKLOG_MAX
        await call.done_writing()


def test_response_batches_close_at_the_byte_limit() -> None:
    # gRPC refuses messages over 4 MiB by default: a writer that fell behind sends its
    # backlog as several batches under BATCH_BYTES_MAX, oldest first, none lost.
    pending = ResponseBatches()
    frame = bytes(100_000)
    for sequence in range(50):  # ~5 MB
        audio = inference_pb2.AudioFrame(data=frame, sequence=sequence)
        pending.add("s1", inference_pb2.StreamSessionResponse(audio_frame=audio))
    sizes, sequences = [], []
    while (batch := pending.take()) is not None:
        sizes.append(batch.ByteSize())
        sequences += [item.response.audio_frame.sequence for item in batch.items]
    assert pending.items == 0
    assert sequences == list(range(50))
    assert len(sizes) >= 5
    assert max(sizes) <= BATCH_BYTES_MAX
