"""The echo backend over real gRPC: turn events, the echoed tone, barge-in."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from services.bridge.bridge_testing import (
    RATE,
    Call,
    audio_requests,
    dominant_hz,
    read,
    serve,
    session_start,
    silence,
    tone,
)
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
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
            "data_channel_message",
            "response_started",
            "audio_frame",
            "response_done",
        ]
        started, stopped = messages[0].speech_started, messages[1].speech_stopped
        assert started.audio_start_ms <= 40
        assert 980 <= stopped.audio_end_ms <= 1200  # webrtcvad hangs over by ~100 ms
        assert started.item_id == stopped.item_id != ""
        committed = json.loads(messages[2].data_channel_message.json)
        assert committed["type"] == "input_audio_buffer.committed"
        assert committed["item_id"] == started.item_id
        response_id = messages[3].response_started.response_id
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


async def test_think_time_holds_the_answer_back_and_a_tone_ends_to_the_frame() -> None:
    servicer = BridgeServicer(dataclasses.replace(SETTINGS, echo_think_ms=300))
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        assert await read(call) is not None
        for request in audio_requests(np.concatenate([tone(440, 1.0), silence(1.0)])):
            await call.write(request)
        loop = asyncio.get_running_loop()
        arrivals: dict[str, float] = {}
        stopped_ms = -1
        for _ in range(500):
            message = await read(call)
            assert message is not None
            kind = str(message.WhichOneof("payload"))
            arrivals.setdefault(kind, loop.time())
            if kind == "speech_stopped":
                stopped_ms = message.speech_stopped.audio_end_ms
            if kind == "audio_frame":
                break
        # The energy floor: the end is the tone's own, not webrtcvad's ~100 ms hangover.
        assert 1000 <= stopped_ms <= 1010
        # The answer's audio waits out the think time after ResponseStarted (a lower bound:
        # a sleep is never shorter).
        assert arrivals["audio_frame"] - arrivals["response_started"] >= 0.29
        call.cancel()
        await asyncio.wait_for(servicer.wait_idle(), 5)


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
        assert seen[:4] == [
            "speech_started",
            "speech_stopped",
            "data_channel_message",
            "response_started",
        ]

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
            "data_channel_message",
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
        assert kinds(messages) == [
            "speech_started",
            "speech_stopped",
            "data_channel_message",
            "response_started",
        ]
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


def _client_event(event: dict[str, object]) -> inference_pb2.StreamSessionRequest:
    return inference_pb2.StreamSessionRequest(
        data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(event))
    )


def _event_types(messages: list[inference_pb2.StreamSessionResponse]) -> list[str]:
    """Payload kinds (runs of audio frames as one), data-channel JSON named by its type."""
    out: list[str] = []
    for message in messages:
        kind = str(message.WhichOneof("payload"))
        if kind == "data_channel_message":
            kind = json.loads(message.data_channel_message.json)["type"]
        if not (kind == "audio_frame" and out and out[-1] == kind):
            out.append(kind)
    return out


async def _read_until(
    call: Call, done: str, limit: int = 600
) -> list[inference_pb2.StreamSessionResponse]:
    messages = []
    for _ in range(limit):
        message = await read(call)
        assert message is not None
        messages.append(message)
        kind = message.WhichOneof("payload")
        text = message.data_channel_message.json if kind == "data_channel_message" else ""
        if kind == done or (text and json.loads(text)["type"] == done):
            return messages
    raise AssertionError(f"no {done} in {limit} messages")


@contextlib.asynccontextmanager
async def echo_session(
    start: inference_pb2.StreamSessionRequest | None = None,
) -> AsyncIterator[tuple[Call, inference_pb2.StreamSessionResponse]]:
    """One echo session over real gRPC: the call and the bridge's SessionAccepted; the
    session is cancelled and the servicer idle afterwards."""
    servicer = BridgeServicer(SETTINGS)
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(start or session_start())
        accepted = await read(call)
        assert accepted is not None
        yield call, accepted
        call.cancel()
        await asyncio.wait_for(servicer.wait_idle(), 5)


async def _speak(call: Call, seconds: float, pause_s: float) -> None:
    for request in audio_requests(np.concatenate([tone(440, seconds), silence(pause_s)])):
        await call.write(request)


async def test_accepted_tells_the_transceiver_the_echo_defaults() -> None:
    async with echo_session() as (_, accepted):
        answer = accepted.session_accepted
        assert not answer.sends_session_events
        defaults = json_format.MessageToDict(answer.session_defaults)
        detection = defaults["audio"]["input"]["turn_detection"]
        assert detection["type"] == "server_vad"
        assert detection["silence_duration_ms"] == 400
        assert detection["create_response"] is True


async def test_push_to_talk_commits_and_answers_on_response_create() -> None:
    async with echo_session() as (call, _):
        await call.write(
            _client_event(
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"turn_detection": None}}},
                }
            )
        )
        await call.write(_client_event({"type": "input_audio_buffer.commit"}))  # nothing yet
        empty = await _read_until(call, "error")
        assert json.loads(empty[-1].data_channel_message.json)["error"]["code"] == (
            "input_audio_buffer_commit_empty"
        )
        # Speech then silence: with turn detection off, no speech events and no answer.
        await _speak(call, 1.0, 1.0)
        await call.write(_client_event({"type": "input_audio_buffer.commit"}))
        committed = await _read_until(call, "input_audio_buffer.committed")
        assert _event_types(committed) == ["input_audio_buffer.committed"]
        await call.write(_client_event({"type": "response.create"}))
        answer = await _read_until(call, "response_done")
        assert _event_types(answer) == ["response_started", "audio_frame", "response_done"]
        audio = b"".join(m.audio_frame.data for m in answer if m.HasField("audio_frame"))
        assert abs(dominant_hz(audio) - 440) <= 440 * 0.03
        assert 90 <= len(audio) // 960 <= 110  # everything since the session began: 2 s
        await call.write(_client_event({"type": "input_audio_buffer.clear"}))
        cleared = await _read_until(call, "input_audio_buffer.cleared")
        assert _event_types(cleared) == ["input_audio_buffer.cleared"]


async def test_output_audio_buffer_clear_cancels_without_another_clear() -> None:
    async with echo_session() as (call, _):
        await _speak(call, 1.0, 0.6)
        await _read_until(call, "audio_frame")
        await call.write(_client_event({"type": "output_audio_buffer.clear"}))
        after = await _read_until(call, "response_done")
        assert "clear" not in _event_types(after)  # the transceiver cleared already
        assert after[-1].response_done.cancelled


async def test_create_response_false_waits_for_response_create() -> None:
    start = session_start()
    detection: dict[str, Any] = {"type": "server_vad", "create_response": False}
    start.session_start.session_config.update({"audio": {"input": {"turn_detection": detection}}})
    async with echo_session(start) as (call, _):
        await _speak(call, 1.0, 1.0)
        turn = await _read_until(call, "input_audio_buffer.committed")
        assert _event_types(turn) == [
            "speech_started",
            "speech_stopped",
            "input_audio_buffer.committed",
        ]
        await call.write(_client_event({"type": "response.create"}))
        answer = await _read_until(call, "response_done")
        assert _event_types(answer)[0] == "response_started"
        assert not answer[-1].response_done.cancelled
