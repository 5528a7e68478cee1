"""Test kit for upstream sessions that end: a Realtime endpoint (real aiohttp WebSocket
server on 127.0.0.1:0) that talks on request and closes each connection at a limit, and a
caller that keeps it talking over real gRPC and measures the gaps it would hear.
`realtime_test` runs it time-compressed; `//tests/bench:upstream_reconnect` at full length."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from services.bridge.bridge_testing import Call, read, session_start
from voiceedge.inference.v1 import inference_pb2

RATE = 24000
GOAWAY_EVENT = "session.go_away"


def _b64(samples: np.ndarray) -> str:
    return base64.b64encode(samples.astype("<i2").tobytes()).decode()


@dataclasses.dataclass
class TalkingRealtime:
    """Answers each `response.create` with `answer_s` of a tone, streamed in real time
    (`chunk_s` per delta, as a model generates), with its transcript. Each connection
    ends `limit_s` after it opened: odd-numbered ones as OpenAI does at its session limit
    (an `error` session_expired, then close 1001), even ones with a bare close 1001 (a
    drop). With `goaway_ahead_s` a go-away event comes that long before the close."""

    limit_s: float
    goaway_ahead_s: float | None = None
    answer_s: float = 1.0
    chunk_s: float = 0.1
    connections: int = 0
    response_creates: int = 0
    responses: list[str] = dataclasses.field(default_factory=list)
    replayed: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    _ids: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        number = self.connections
        replayed: list[dict[str, Any]] = []
        self.replayed.append(replayed)
        await ws.send_json({"type": "session.created", "session": {"id": f"sess_{number}"}})
        tasks = {asyncio.create_task(self._limit(ws, number))}
        try:
            async for message in ws:
                if message.type is not WSMsgType.TEXT:
                    break
                event = json.loads(message.data)
                kind = event.get("type")
                if kind == "session.update":
                    await ws.send_json({"type": "session.updated", "session": event["session"]})
                elif kind == "conversation.item.create":
                    replayed.append(event["item"])
                    await ws.send_json({"type": "conversation.item.added", "item": event["item"]})
                elif kind == "response.create":
                    self.response_creates += 1
                    tasks.add(asyncio.create_task(self._answer(ws)))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return ws

    async def _limit(self, ws: web.WebSocketResponse, number: int) -> None:
        loop = asyncio.get_running_loop()
        close_at = loop.time() + self.limit_s
        if self.goaway_ahead_s is not None:
            await asyncio.sleep(max(0.0, self.limit_s - self.goaway_ahead_s))
            time_left_ms = round((close_at - loop.time()) * 1000)
            await ws.send_json({"type": GOAWAY_EVENT, "time_left_ms": time_left_ms})
        await asyncio.sleep(max(0.0, close_at - loop.time()))
        if number % 2:
            error = {
                "type": "invalid_request_error",
                "code": "session_expired",
                "message": "Your session hit the maximum duration.",
            }
            with contextlib.suppress(ConnectionError):
                await ws.send_json({"type": "error", "error": error})
        await ws.close(code=1001, message=b"session limit")

    async def _answer(self, ws: web.WebSocketResponse) -> None:
        n = next(self._ids)
        response, item = f"resp_{n}", f"item_{n}"
        self.responses.append(response)
        loop = asyncio.get_running_loop()
        await ws.send_json({"type": "response.created", "response": {"id": response}})
        chunk = int(RATE * self.chunk_s)
        t = np.arange(int(RATE * self.answer_s)) / RATE
        audio = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        start = loop.time()
        for i, offset in enumerate(range(0, len(audio), chunk)):
            await asyncio.sleep(max(0.0, start + i * self.chunk_s - loop.time()))
            delta = _b64(audio[offset : offset + chunk])
            await ws.send_json(
                {"type": "response.output_audio.delta", "item_id": item, "delta": delta}
            )
        await ws.send_json(
            {
                "type": "response.output_audio_transcript.done",
                "item_id": item,
                "transcript": f"answer {n}",
            }
        )
        await ws.send_json({"type": "response.output_audio.done", "item_id": item})
        await ws.send_json(
            {"type": "response.done", "response": {"id": response, "status": "completed"}}
        )


@contextlib.asynccontextmanager
async def talking_realtime(fake: TalkingRealtime) -> AsyncIterator[str]:
    """Serves `fake` on 127.0.0.1:0; yields its ws:// URL."""
    app = web.Application()
    app.router.add_get("/v1/realtime", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}/v1/realtime?model=talking"
    finally:
        await runner.cleanup()


@dataclasses.dataclass
class CallReport:
    """What the caller got. `gaps` are (seconds into the call, ms of silence) a playout
    that plays each 20 ms frame on arrival, or right after the one before, would have
    heard; a gap is audio arriving later than the previous frame's end."""

    frames: int = 0
    gaps: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    started: list[str] = dataclasses.field(default_factory=list)
    done: list[str] = dataclasses.field(default_factory=list)
    cancelled: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    end: inference_pb2.SessionEnd | None = None

    @property
    def max_gap_ms(self) -> float:
        return max((ms for _, ms in self.gaps), default=0.0)


def _request(event: dict[str, Any]) -> inference_pb2.StreamSessionRequest:
    return inference_pb2.StreamSessionRequest(
        data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(event))
    )


class _Writer:
    """One writer at a time on the call (grpc.aio refuses concurrent writes)."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._lock = asyncio.Lock()

    async def write(self, request: inference_pb2.StreamSessionRequest) -> None:
        async with self._lock:
            await self._call.write(request)


async def _speak_silence(call: _Writer, seconds: float) -> None:
    """Caller audio as a microphone sends it: 20 ms of silence every 20 ms."""
    frame = inference_pb2.StreamSessionRequest(
        audio_frame=inference_pb2.AudioFrame(data=bytes(RATE // 50 * 2))
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(int(seconds * 50)):
        await asyncio.sleep(max(0.0, start + i * 0.02 - loop.time()))
        await call.write(frame)


async def run_call(stub: Any, seconds: float) -> CallReport:
    """One call of `seconds`: asks for the next answer as soon as one is done, so the model
    talks all the time; returns what the caller heard."""
    report = CallReport()
    call: Call = stub.StreamSession(None)
    await call.write(session_start())
    accepted = await read(call)
    assert accepted is not None
    assert accepted.HasField("session_accepted"), accepted
    writer = _Writer(call)
    await writer.write(_request({"type": "response.create"}))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    speaker = asyncio.create_task(_speak_silence(writer, seconds))
    play_end: float | None = None
    try:
        while loop.time() - t0 < seconds:
            message = await asyncio.wait_for(read(call), 10)
            assert message is not None, "the bridge ended the stream"
            kind = message.WhichOneof("payload")
            if kind == "audio_frame":
                now = loop.time()
                report.frames += 1
                if play_end is not None and now > play_end:
                    report.gaps.append((round(now - t0, 3), (now - play_end) * 1000))
                play_end = max(now, play_end or now) + 0.02
            elif kind == "response_started":
                report.started.append(message.response_started.response_id)
            elif kind == "response_done":
                report.done.append(message.response_done.response_id)
                report.cancelled += message.response_done.cancelled
                await writer.write(_request({"type": "response.create"}))
            elif kind == "data_channel_message":
                event = json.loads(message.data_channel_message.json)
                if event.get("type") == "error":
                    report.errors.append(message.data_channel_message.json)
            elif kind == "session_end":
                report.end = message.session_end
                return report
    finally:
        speaker.cancel()
        await asyncio.gather(speaker, return_exceptions=True)
        call.cancel()
    return report
