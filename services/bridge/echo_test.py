"""The echo backend over real gRPC: turn events, the echoed tone, barge-in."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np

from services.bridge.service import BridgeServicer
from services.bridge.settings import BridgeSettings
from services.bridge.testing import (
    RATE,
    audio_requests,
    dominant_hz,
    read,
    serve,
    session_start,
    silence,
    tone,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

SETTINGS = BridgeSettings(end_of_turn_silence_ms=400, short_utterance_extra_silence_ms=0)


def kinds(messages: list[inference_pb2.StreamSessionResponse]) -> list[str]:
    """Payload names with runs of audio frames collapsed to one 'audio_frame'."""
    out: list[str] = []
    for message in messages:
        kind = str(message.WhichOneof("payload"))
        if not (kind == "audio_frame" and out and out[-1] == kind):
            out.append(kind)
    return out


async def test_echo_plays_the_utterance_back() -> None:
    servicer = BridgeServicer(SETTINGS)
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        accepted = await read(call)
        assert accepted is not None
        assert accepted.session_accepted.output_format.sample_rate_hz == RATE
        assert accepted.session_accepted.output_format.channels == 1
        for request in audio_requests(np.concatenate([tone(440, 1.0), silence(1.0)])):
            await call.write(request)
        messages = []
        for _ in range(500):
            message = await read(call)
            assert message is not None
            messages.append(message)
            if message.HasField("response_done"):
                break
        assert kinds(messages) == [
            "speech_started",
            "speech_stopped",
            "response_started",
            "audio_frame",
            "response_done",
        ]
        started, stopped = messages[0].speech_started, messages[1].speech_stopped
        assert started.audio_start_ms <= 40
        assert 980 <= stopped.audio_end_ms <= 1200  # webrtcvad hangs over by ~100 ms
        assert started.item_id == stopped.item_id != ""
        response_id = messages[2].response_started.response_id
        assert messages[-1].response_done.response_id == response_id
        assert not messages[-1].response_done.cancelled
        frames = [m.audio_frame for m in messages if m.HasField("audio_frame")]
        assert [f.sequence for f in frames] == list(range(len(frames)))
        assert [f.timestamp_samples for f in frames] == [480 * i for i in range(len(frames))]
        assert all(len(f.data) == 960 for f in frames)
        assert 49 <= len(frames) <= 61  # the 1 s tone (+ VAD hangover), no prefix before 0
        assert abs(dominant_hz(b"".join(f.data for f in frames)) - 440) <= 440 * 0.03

        await call.write(
            inference_pb2.StreamSessionRequest(
                session_end=inference_pb2.SessionEnd(reason=common_pb2.CLOSE_REASON_CLIENT_HANGUP)
            )
        )
        assert await read(call) is None
        assert await call.code() == grpc.StatusCode.OK
    assert servicer.session_count == 0


async def test_barge_in_clears_at_once() -> None:
    servicer = BridgeServicer(SETTINGS)
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        for request in audio_requests(np.concatenate([tone(440, 1.0), silence(0.6)])):
            await call.write(request)
        seen = []
        audio_before = 0
        for _ in range(100):
            message = await read(call)
            assert message is not None
            seen.append(message.WhichOneof("payload"))
            if message.HasField("audio_frame"):
                audio_before += 1
                if audio_before == 3:
                    break
        assert seen[:3] == ["speech_started", "speech_stopped", "response_started"]

        # The caller talks over the response (a different pitch: 660 Hz), then pauses.
        for request in audio_requests(np.concatenate([tone(660, 0.6), silence(0.8)]), 80):
            await call.write(request)
        after: list[inference_pb2.StreamSessionResponse] = []
        for _ in range(500):
            message = await read(call)
            assert message is not None
            after.append(message)
            if message.HasField("response_done") and not message.response_done.cancelled:
                break
        payloads = [m.WhichOneof("payload") for m in after]
        clear_at = payloads.index("clear")
        # Only frames already in flight precede the clear; none follow it: the response ends
        # cancelled and the new speech is announced.
        assert set(payloads[:clear_at]) <= {"audio_frame"}
        assert payloads[clear_at : clear_at + 3] == ["clear", "response_done", "speech_started"]
        assert after[clear_at + 1].response_done.cancelled
        assert after[clear_at + 1].response_done.response_id == "resp_echo_1"
        assert audio_before + clear_at < 45  # the 1 s response was cut short
        order = kinds(after[clear_at:])
        # The interrupting utterance becomes the next turn and is echoed in turn.
        assert order[3:] == [
            "speech_stopped",
            "response_started",
            "audio_frame",
            "response_done",
        ]
        second = b"".join(m.audio_frame.data for m in after[clear_at:] if m.HasField("audio_frame"))
        assert abs(dominant_hz(second) - 660) <= 660 * 0.03
        call.cancel()
        await asyncio.wait_for(servicer.wait_idle(), 5)


async def test_session_update_retunes_end_of_turn() -> None:
    """A caller who pauses 1 s mid-thought is not cut off once they ask for 1.5 s."""
    servicer = BridgeServicer(SETTINGS)
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        update = {
            "type": "session.update",
            "session": {"turn_detection": {"silence_duration_ms": 1500}},
        }
        await call.write(
            inference_pb2.StreamSessionRequest(
                data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(update))
            )
        )
        speech = np.concatenate([tone(440, 1.0), silence(1.0), tone(440, 1.0), silence(2.0)])
        for request in audio_requests(speech):
            await call.write(request)
        messages = []
        for _ in range(500):
            message = await read(call)
            assert message is not None
            messages.append(message)
            if message.HasField("response_started"):
                break
        assert kinds(messages) == ["speech_started", "speech_stopped", "response_started"]
        assert 2980 <= messages[1].speech_stopped.audio_end_ms <= 3200  # one turn, both tones
        call.cancel()
        await asyncio.wait_for(servicer.wait_idle(), 5)


async def test_stereo_48k_input_is_echoed_as_24k_mono() -> None:
    servicer = BridgeServicer(SETTINGS)
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start(sample_rate_hz=48000, channels=2))
        assert await read(call) is not None
        mono = np.concatenate([tone(500, 1.0, 48000), silence(1.0, 48000)])
        stereo = np.repeat(mono, 2)  # L = R, interleaved
        for offset in range(0, len(stereo), 1920):  # 20 ms of 48 kHz stereo
            await call.write(
                inference_pb2.StreamSessionRequest(
                    audio_frame=inference_pb2.AudioFrame(
                        data=stereo[offset : offset + 1920].astype("<i2").tobytes()
                    )
                )
            )
        frames = []
        for _ in range(500):
            message = await read(call)
            assert message is not None
            if message.HasField("audio_frame"):
                frames.append(message.audio_frame)
            if message.HasField("response_done"):
                break
        assert all(f.format.sample_rate_hz == RATE and f.format.channels == 1 for f in frames)
        assert 49 <= len(frames) <= 61
        assert abs(dominant_hz(b"".join(f.data for f in frames)) - 500) <= 500 * 0.03
        call.cancel()
        await asyncio.wait_for(servicer.wait_idle(), 5)
