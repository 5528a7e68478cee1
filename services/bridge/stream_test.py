"""StreamSession protocol over real gRPC: refusals, the ways a stream ends, cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
import grpc.aio
import pytest

from services.bridge.bridge_testing import Call, audio_requests, read, serve, session_start, tone
from services.bridge.servicer import BridgeServicer, negotiate_input
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2


async def expect_status(call: Call, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read(call)
    assert info.value.code() == code
    assert text in (info.value.details() or "")


async def test_first_message_must_be_session_start() -> None:
    async with serve(BridgeServicer(BridgeSettings())) as stub:
        call = stub.StreamSession(None)
        await call.write(audio_requests(tone(440, 0.02))[0])
        await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "session_start")
        empty = stub.StreamSession(None)
        await empty.done_writing()
        await expect_status(empty, grpc.StatusCode.INVALID_ARGUMENT, "before session_start")
        nameless = stub.StreamSession(None)
        await nameless.write(session_start(""))
        await expect_status(nameless, grpc.StatusCode.INVALID_ARGUMENT, "session_id")


async def test_unsupported_format_is_invalid_argument() -> None:
    async with serve(BridgeServicer(BridgeSettings())) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start(encoding=common_pb2.AUDIO_ENCODING_OPUS))
        await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "AUDIO_ENCODING_OPUS")


@pytest.mark.parametrize(
    ("rate", "channels", "expected"),
    [(0, 0, (24000, 1)), (16000, 2, (16000, 2)), (48000, 1, (48000, 1))],
)
def test_negotiate_input_defaults(rate: int, channels: int, expected: tuple[int, int]) -> None:
    fmt = common_pb2.AudioFormat(sample_rate_hz=rate, channels=channels)
    assert negotiate_input(fmt, 24000) == expected


@pytest.mark.parametrize(
    ("rate", "channels", "text"), [(96000, 1, "sample_rate_hz"), (24000, 6, "channels")]
)
def test_negotiate_input_refuses(rate: int, channels: int, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        negotiate_input(common_pb2.AudioFormat(sample_rate_hz=rate, channels=channels), 24000)


async def test_duplicate_session_and_capacity() -> None:
    servicer = BridgeServicer(BridgeSettings(max_sessions=1))
    async with serve(servicer) as stub:
        first = stub.StreamSession(None)
        await first.write(session_start("a"))
        assert (await read(first)) is not None
        again = stub.StreamSession(None)
        await again.write(session_start("a"))
        await expect_status(again, grpc.StatusCode.ALREADY_EXISTS, "a")
        other = stub.StreamSession(None)
        await other.write(session_start("b"))
        await expect_status(other, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_sessions=1")
        await first.done_writing()  # half-close without SessionEnd also ends the session
        assert await read(first) is None
        assert await first.code() == grpc.StatusCode.OK
        assert servicer.session_count == 0


async def test_client_cancel_cleans_up() -> None:
    servicer = BridgeServicer(BridgeSettings(end_of_turn_silence_ms=100))
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        for request in audio_requests(tone(440, 0.5)):
            await call.write(request)
        message = await read(call)
        assert message is not None
        assert message.HasField("speech_started")
        call.cancel()
        await asyncio.wait_for(servicer.wait_idle(), 5)  # cleanup runs after the cancel


async def test_close_ends_sessions_as_drained() -> None:
    servicer = BridgeServicer(BridgeSettings())
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        drain = asyncio.create_task(servicer.drain(1.0))
        refused = stub.StreamSession(None)
        await refused.write(session_start("late"))
        await expect_status(refused, grpc.StatusCode.UNAVAILABLE, "draining")
        await servicer.close()
        end = await read(call)
        assert end is not None
        assert end.session_end.reason == common_pb2.CLOSE_REASON_DRAINED
        assert await read(call) is None
        await asyncio.wait_for(drain, 5)
        assert servicer.session_count == 0


async def test_unknown_client_events_are_ignored() -> None:
    async with serve(BridgeServicer(BridgeSettings())) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        for text in ["not json", "[1]", '{"type": "response.cancel"}', '{"type": "x"}']:
            await call.write(
                inference_pb2.StreamSessionRequest(
                    data_channel_message=inference_pb2.DataChannelMessage(json=text)
                )
            )
        await call.write(session_start("again"))  # a second session_start is dropped
        await call.write(inference_pb2.StreamSessionRequest(session_end=inference_pb2.SessionEnd()))
        assert await read(call) is None
        assert await call.code() == grpc.StatusCode.OK


class CrashingBackend:
    """A backend with a bug: the first audio frame raises."""

    sends_session_events = False
    session_defaults: Mapping[str, Any] | None = None

    async def start(self) -> None:
        pass

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        raise RuntimeError("bug")

    async def on_data_channel(self, text: str) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_backend_bug_ends_only_its_session() -> None:
    servicer = BridgeServicer(
        BridgeSettings(), backend_factory=lambda ctx, settings: CrashingBackend()
    )
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        await call.write(audio_requests(tone(440, 0.02))[0])
        end = await read(call)
        assert end is not None
        assert end.session_end.reason == common_pb2.CLOSE_REASON_INTERNAL_ERROR
        assert await read(call) is None
        assert servicer.session_count == 0
