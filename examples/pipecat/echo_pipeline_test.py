"""The example pipeline in the bridge's pipecat backend over real gRPC: the turn comes back,
a barge-in clears it, the pipeline's hang-up ends the session, and a factory that cannot be
loaded is the session's error, not the bridge's."""

from __future__ import annotations

import json

import numpy as np

from services.bridge.bridge_testing import (
    Call,
    audio_requests,
    dominant_hz,
    read,
    read_until,
    serve,
    session_start,
    silence,
    tone,
)
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

FACTORY = "examples.pipecat.echo_pipeline:create_pipeline"
SETTINGS = BridgeSettings(backend="pipecat", pipecat_factory=FACTORY)
Message = inference_pb2.StreamSessionResponse


async def _start(call: Call) -> None:
    await call.write(session_start())
    accepted = await read(call)
    assert accepted is not None
    assert accepted.HasField("session_accepted"), accepted


async def _read_until(call: Call, kind: str, seen: list[Message]) -> Message:
    """Reads (into `seen`) until a message with payload `kind`."""
    seen += await read_until(call, kind)
    return seen[-1]


def _audio(seen: list[Message]) -> bytes:
    return b"".join(m.audio_frame.data for m in seen if m.HasField("audio_frame"))


def _client_event(event: dict[str, object]) -> inference_pb2.StreamSessionRequest:
    return inference_pb2.StreamSessionRequest(
        data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(event))
    )


async def test_the_turn_comes_back_then_the_pipeline_hangs_up() -> None:
    async with serve(BridgeServicer(SETTINGS)) as stub:
        call = stub.StreamSession(None)
        await _start(call)
        # Bad caller events are dropped (logged), the session goes on.
        for text in ("not json", "[1, 2]", '"a string"'):
            await call.write(
                inference_pb2.StreamSessionRequest(
                    data_channel_message=inference_pb2.DataChannelMessage(json=text)
                )
            )
        for request in audio_requests(np.concatenate([tone(440, 0.8), silence(1.0)])):
            await call.write(request)
        seen: list[Message] = []
        turn = await _read_until(call, "data_channel_message", seen)
        assert json.loads(turn.data_channel_message.json)["type"] == "example.turn"
        started = await _read_until(call, "response_started", seen)
        done = await _read_until(call, "response_done", seen)
        assert done.response_done.response_id == started.response_started.response_id
        assert not done.response_done.cancelled
        echoed = _audio(seen)
        assert len(echoed) >= 24000 * 2 // 2, "less than 0.5 s of echo"
        assert abs(dominant_hz(echoed) - 440) < 20
        await call.write(_client_event({"type": "example.hang_up"}))
        end = await _read_until(call, "session_end", seen)
        assert end.session_end.reason == common_pb2.CLOSE_REASON_BRIDGE_ENDED
        assert await read(call) is None


async def test_speaking_during_the_echo_clears_it() -> None:
    async with serve(BridgeServicer(SETTINGS)) as stub:
        call = stub.StreamSession(None)
        await _start(call)
        for request in audio_requests(np.concatenate([tone(440, 2.0), silence(0.8)])):
            await call.write(request)
        seen: list[Message] = []
        await _read_until(call, "response_started", seen)
        await _read_until(call, "audio_frame", seen)
        for request in audio_requests(tone(660, 0.5)):  # barge in
            await call.write(request)
        await _read_until(call, "clear", seen)
        done = await _read_until(call, "response_done", seen)
        assert done.response_done.cancelled
        call.cancel()


async def test_a_factory_that_cannot_load_ends_the_session_with_an_error() -> None:
    settings = BridgeSettings(backend="pipecat", pipecat_factory="examples.pipecat.nowhere:f")
    async with serve(BridgeServicer(settings)) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        end = await read(call)
        assert end is not None
        assert end.HasField("session_end"), end
        assert end.session_end.reason == common_pb2.CLOSE_REASON_BRIDGE_ERROR
        assert "examples.pipecat.nowhere" in end.session_end.detail
