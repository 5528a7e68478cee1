"""The realtime backend against a local aiohttp WebSocket server speaking the documented
OpenAI Realtime event shapes (no network), through real gRPC; the event mapper as a table."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp import WSMsgType, web

from services.bridge.bridge_testing import (
    Call,
    audio_requests,
    dominant_hz,
    read,
    read_until,
    serve,
    session_start,
    tone,
)
from services.bridge.realtime import (
    AfterAudio,
    Audio,
    BargeIn,
    Emit,
    End,
    ServerEventMapper,
)
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

KEY = "test-key"


def b64(samples: np.ndarray) -> str:
    return base64.b64encode(samples.astype("<i2").tobytes()).decode()


class FakeRealtime:
    """A Realtime endpoint: records client events, answers scripted server events."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.appended_bytes = 0
        self.got_update = asyncio.Event()
        self.truncated = asyncio.Event()
        self.auth_headers: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.Response(status=401, text="bad key")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "session.created", "session": {"id": "sess_x"}})
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                break
            event = json.loads(message.data)
            self.received.append(event)
            await self.react(ws, event)
        return ws

    async def react(self, ws: web.WebSocketResponse, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "session.update":
            self.got_update.set()
            await ws.send_json({"type": "session.updated", "session": event["session"]})
        elif kind == "input_audio_buffer.append":
            self.appended_bytes += len(base64.b64decode(event["audio"]))
            if self.appended_bytes == 10 * 960:  # 200 ms received: a whole turn
                await self.turn(ws)
        elif kind == "conversation.item.truncate":
            self.truncated.set()
        elif kind == "test.barge_in":
            await self.long_answer(ws, "resp_2", "item_b")
            await ws.send_json({"type": "input_audio_buffer.speech_started", "audio_start_ms": 900})
            await ws.send_json(
                {"type": "response.done", "response": {"id": "resp_2", "status": "cancelled"}}
            )
        elif kind == "test.long_answer":
            await self.long_answer(ws, "resp_3", "item_c")
        elif kind == "test.error":
            await ws.send_json(
                {"type": "error", "error": {"type": "server_error", "message": "boom"}}
            )
        elif kind == "test.close":
            await ws.close()

    async def long_answer(self, ws: web.WebSocketResponse, response: str, item: str) -> None:
        """A response with 2 s of audio in one delta, left open."""
        await ws.send_json({"type": "response.created", "response": {"id": response}})
        await ws.send_json(
            {"type": "response.output_audio.delta", "item_id": item, "delta": b64(tone(440, 2.0))}
        )

    async def turn(self, ws: web.WebSocketResponse) -> None:
        item = {"item_id": "item_1"}
        await ws.send_json(
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": 20, **item}
        )
        await ws.send_json(
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 180, **item}
        )
        await ws.send_json(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "transcript": "hello",
                **item,
            }
        )
        await ws.send_json({"type": "response.created", "response": {"id": "resp_1"}})
        answer = tone(440, 0.31)  # 15.5 frames: the last one is padded
        await ws.send_json({"type": "response.output_audio.delta", "delta": b64(answer[:3000])})
        await ws.send_json(
            {"type": "response.output_audio_transcript.delta", "item_id": "item_2", "delta": "hi"}
        )
        await ws.send_json({"type": "response.audio.delta", "delta": b64(answer[3000:])})
        await ws.send_json({"type": "response.output_audio.done", "item_id": "item_2"})
        await ws.send_json({"type": "response.output_audio_transcript.done", "item_id": "item_2"})
        await ws.send_json({"type": "rate_limits.updated", "rate_limits": []})
        await ws.send_json(
            {"type": "response.done", "response": {"id": "resp_1", "status": "completed"}}
        )


@contextlib.asynccontextmanager
async def fake_realtime() -> AsyncIterator[tuple[FakeRealtime, str]]:
    fake = FakeRealtime()
    app = web.Application()
    app.router.add_get("/v1/realtime", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"ws://127.0.0.1:{port}/v1/realtime?model=test-model"
    finally:
        await runner.cleanup()


def settings(url: str, key: str = KEY) -> BridgeSettings:
    return BridgeSettings(backend="realtime", realtime_url=url, realtime_api_key=key)


def client_event(event: dict[str, Any]) -> inference_pb2.StreamSessionRequest:
    return inference_pb2.StreamSessionRequest(
        data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(event))
    )


async def open_session(stub: Any) -> Call:
    call: Call = stub.StreamSession(None)
    await call.write(session_start())
    accepted = await read(call)
    assert accepted is not None
    assert accepted.HasField("session_accepted")
    return call


async def test_a_turn_maps_both_ways() -> None:
    async with fake_realtime() as (fake, url), serve(BridgeServicer(settings(url))) as stub:
        call = await open_session(stub)
        first = await read(call)
        assert first is not None
        assert json.loads(first.data_channel_message.json)["type"] == "session.created"
        await call.write(client_event({"type": "conversation.item.create", "item": {"x": 1}}))
        for request in audio_requests(tone(300, 0.2)):
            await call.write(request)
        messages = await read_until(call, "response_done")
        payloads = [m.WhichOneof("payload") for m in messages]
        assert payloads[0] == "data_channel_message"  # session.updated, passed through
        assert json.loads(messages[0].data_channel_message.json)["type"] == "session.updated"
        events = [p for p in payloads[1:] if p not in ("audio_frame",)]
        assert events[:4] == [
            "speech_started",
            "speech_stopped",
            "transcript_delta",
            "response_started",
        ]
        speech = messages[payloads.index("speech_started")].speech_started
        assert (speech.audio_start_ms, speech.item_id) == (20, "item_1")
        assert messages[payloads.index("speech_stopped")].speech_stopped.audio_end_ms == 180
        transcripts = [m.transcript_delta for m in messages if m.HasField("transcript_delta")]
        assert [(t.item_id, t.delta, t.final, t.source) for t in transcripts] == [
            ("item_1", "hello", True, inference_pb2.TRANSCRIPT_SOURCE_INPUT),
            ("item_2", "hi", False, inference_pb2.TRANSCRIPT_SOURCE_OUTPUT),
            ("item_2", "", True, inference_pb2.TRANSCRIPT_SOURCE_OUTPUT),
        ]
        passthrough = [
            json.loads(m.data_channel_message.json)["type"]
            for m in messages
            if m.HasField("data_channel_message")
        ]
        assert passthrough == ["session.updated", "rate_limits.updated"]
        frames = [m.audio_frame for m in messages if m.HasField("audio_frame")]
        assert len(frames) == 16
        assert payloads.index("response_started") < payloads.index("audio_frame")
        assert payloads[-1] == "response_done"
        assert messages[-1].response_done.response_id == "resp_1"
        assert not messages[-1].response_done.cancelled
        assert [f.sequence for f in frames] == list(range(16))
        assert abs(dominant_hz(b"".join(f.data for f in frames)) - 440) <= 440 * 0.03

        # What the endpoint received: session.update first, the client event as-is, audio.
        assert fake.auth_headers == [f"Bearer {KEY}"]
        assert fake.received[0]["type"] == "session.update"
        audio_format = fake.received[0]["session"]["audio"]["input"]["format"]
        assert audio_format == {"type": "audio/pcm", "rate": 24000}
        assert fake.received[1] == {"type": "conversation.item.create", "item": {"x": 1}}
        appended = [e for e in fake.received if e["type"] == "input_audio_buffer.append"]
        assert len(appended) == 10
        await call.write(inference_pb2.StreamSessionRequest(session_end=inference_pb2.SessionEnd()))
        assert await read(call) is None
        assert await call.code() == grpc.StatusCode.OK


async def test_server_speech_interrupts_playing_audio() -> None:
    async with fake_realtime() as (fake, url):
        servicer = BridgeServicer(settings(url))
        async with serve(servicer) as stub:
            call = await open_session(stub)
            await call.write(client_event({"type": "test.barge_in"}))
            messages = await read_until(call, "response_done")
            payloads = [m.WhichOneof("payload") for m in messages]
            clear_at = payloads.index("clear")
            assert payloads[clear_at:] == ["clear", "speech_started", "response_done"]
            assert messages[-1].response_done.cancelled
            assert payloads.count("audio_frame") < 30  # of 100 frames, only the lead went out
            await asyncio.wait_for(fake.truncated.wait(), 5)
            (truncate,) = [e for e in fake.received if e["type"] == "conversation.item.truncate"]
            assert truncate["item_id"] == "item_b"
            assert truncate["content_index"] == 0
            # The speech came right after the audio: little or none of it was heard.
            assert 0 <= truncate["audio_end_ms"] <= 200
            call.cancel()
            await asyncio.wait_for(servicer.wait_idle(), 5)


async def test_client_clear_truncates_without_reaching_the_model() -> None:
    """`output_audio_buffer.clear` is WebRTC-only: the transceiver already dropped its audio;
    the adapter drops its own queue and tells the model what was heard, nothing more."""
    async with fake_realtime() as (fake, url):
        servicer = BridgeServicer(settings(url))
        async with serve(servicer) as stub:
            call = await open_session(stub)
            await call.write(client_event({"type": "test.long_answer"}))
            await read_until(call, "audio_frame")
            await call.write(client_event({"type": "output_audio_buffer.clear"}))
            await asyncio.wait_for(fake.truncated.wait(), 5)
            kinds = [e["type"] for e in fake.received]
            assert "output_audio_buffer.clear" not in kinds
            (truncate,) = [e for e in fake.received if e["type"] == "conversation.item.truncate"]
            assert truncate["item_id"] == "item_c"
            assert 0 <= truncate["audio_end_ms"] < 1000  # of the 2 s answer
            # Nothing of the 2 s answer follows the clear, and no ClearAudio goes back.
            await call.write(client_event({"type": "test.error"}))
            after = await read_until(call, "session_end")
            payloads = [m.WhichOneof("payload") for m in after]
            assert "clear" not in payloads
            # Of 100 frames only the playout lead (200 ms) had gone out before the clear.
            assert payloads.count("audio_frame") < 30


async def test_error_event_ends_the_session() -> None:
    async with fake_realtime() as (_fake, url), serve(BridgeServicer(settings(url))) as stub:
        call = await open_session(stub)
        await call.write(client_event({"type": "test.error"}))
        messages = await read_until(call, "session_end")
        assert json.loads(messages[-2].data_channel_message.json)["type"] == "error"
        end = messages[-1].session_end
        assert end.reason == common_pb2.CLOSE_REASON_BRIDGE_ERROR
        assert end.detail == "server_error: boom"
        assert await read(call) is None


async def test_endpoint_closing_ends_the_session() -> None:
    async with fake_realtime() as (_fake, url), serve(BridgeServicer(settings(url))) as stub:
        call = await open_session(stub)
        await call.write(client_event({"type": "test.close"}))
        messages = await read_until(call, "session_end")
        assert messages[-1].session_end.reason == common_pb2.CLOSE_REASON_BRIDGE_ENDED
        assert await read(call) is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("case", ["bad key", "refused"])
async def test_connect_failure_refuses_the_session(case: str) -> None:
    async with fake_realtime() as (_fake, url):
        if case == "bad key":
            config = settings(url, key="wrong")
        else:
            config = settings(f"ws://127.0.0.1:{free_port()}/v1/realtime")
        servicer = BridgeServicer(config)
        async with serve(servicer) as stub:
            call = stub.StreamSession(None)
            await call.write(session_start())
            first = await read(call)
            assert first is not None
            assert first.session_end.reason == common_pb2.CLOSE_REASON_BRIDGE_ERROR
            assert "realtime connect" in first.session_end.detail
            assert "wrong" not in first.session_end.detail
            assert await read(call) is None
        assert servicer.session_count == 0


FRAME = 960


def action_names(actions: list[Any]) -> list[str]:
    return [type(a).__name__ for a in actions]


MAPPER_CASES: list[tuple[str, list[str], list[list[str]]]] = [
    ("not json", ["{"], [[]]),
    ("no type", ['{"x": 1}'], [[]]),
    ("bad base64", ['{"type": "response.audio.delta", "delta": "!!"}'], [[]]),
    (
        "audio split in frames, remainder flushed by done",
        [
            json.dumps(
                {
                    "type": "response.output_audio.delta",
                    "delta": base64.b64encode(bytes(FRAME * 2 + 10)).decode(),
                }
            ),
            json.dumps({"type": "response.output_audio.done"}),
        ],
        [["Audio", "Audio"], ["Audio"]],
    ),
    (
        "speech started is a barge-in",
        ['{"type": "input_audio_buffer.speech_started", "audio_start_ms": "x"}'],
        [["BargeIn", "Emit"]],
    ),
    (
        "response done without id or status is cancelled",
        ['{"type": "response.done", "response": null}'],
        [["AfterAudio"]],
    ),
    ("error", ['{"type": "error"}'], [["Emit", "End"]]),
    ("unknown event passes through", ['{"type": "future.event"}'], [["Emit"]]),
]


@pytest.mark.parametrize(
    ("events", "expected"), [c[1:] for c in MAPPER_CASES], ids=[c[0] for c in MAPPER_CASES]
)
def test_mapper_table(events: list[str], expected: list[list[str]]) -> None:
    mapper = ServerEventMapper()
    assert [action_names(mapper.map(e)) for e in events] == expected


def test_mapper_details() -> None:
    mapper = ServerEventMapper()
    (done,) = mapper.map(
        '{"type": "response.done", "response": {"id": "r", "status": "incomplete"}}'
    )
    assert isinstance(done, AfterAudio)
    assert done.message.response_done.response_id == "r"
    assert not done.message.response_done.cancelled
    _, end = mapper.map('{"type": "error", "error": {"message": "m"}}')
    assert isinstance(end, End)
    assert end.detail == "error: m"
    barge, emit = mapper.map('{"type": "input_audio_buffer.speech_started", "audio_start_ms": -5}')
    assert isinstance(barge, BargeIn)
    assert isinstance(emit, Emit)
    assert emit.message.speech_started.audio_start_ms == 0
    delta = json.dumps(
        {"type": "response.audio.delta", "delta": base64.b64encode(bytes(10)).decode()}
    )
    assert mapper.map(delta) == []
    mapper.barge_in()  # the partial frame of the interrupted response is dropped
    assert mapper.map('{"type": "response.audio.done"}') == []
    (audio,) = mapper.map(
        json.dumps(
            {"type": "response.audio.delta", "delta": base64.b64encode(bytes(FRAME)).decode()}
        )
    )
    assert isinstance(audio, Audio)
    assert len(audio.frame) == FRAME
    assert mapper.bad_events == 0
