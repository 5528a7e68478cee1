"""OpenAI's own Python SDK (`openai`, pinned in requirements.lock) against voiceedge with
only its base URL changed: client secrets, a WebRTC call created through the SDK, the
server-side sideband WebSocket (`realtime.connect(call_id=...)`) that sees the call's
events and steers it, and `calls.hangup`.

The caller is an aiortc peer (as a browser would be, it holds only the `ek_`); the edge
runs as its real processes on loopback (tests/e2e/edge.py).
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import openai
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame

from tests.e2e.edge import edge
from tools.demo.stack import Stack

API_KEY = "sk-e2e-openai-sdk-0123456789"
RATE = 48000
FRAME = RATE // 50


class ScriptedSpeaker(MediaStreamTrack):
    """A caller's microphone: silence until `say(samples)`, which plays them once."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None
        self._script = np.zeros(0, dtype=np.int16)
        self._at = 0

    def say(self, samples: np.ndarray[Any, Any]) -> None:
        self._script, self._at = samples.astype(np.int16), 0

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._pts / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # real-time pacing of a microphone, not a sync point
        chunk = self._script[self._at : self._at + FRAME]
        self._at += FRAME
        if len(chunk) < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), dtype=np.int16)])
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = RATE, self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame


def tone(seconds: float, hz: float = 440.0) -> np.ndarray[Any, Any]:
    t = np.arange(int(RATE * seconds)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 0.3 * 32767).astype(np.int16)


def silence(seconds: float) -> np.ndarray[Any, Any]:
    return np.zeros(int(RATE * seconds), dtype=np.int16)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with edge(tmp_path_factory.mktemp("stack"), API_KEY) as running:
        yield running


def _client(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.http_base + "/v1", max_retries=0)


class Inbox:
    """The caller's data-channel events, with a way to await a condition on them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._new = asyncio.Event()

    def add(self, text: str | bytes) -> None:
        self.events.append(json.loads(text))
        self._new.set()

    async def until(self, check: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not check(self.events):
                self._new.clear()
                await self._new.wait()


class Sideband:
    """The SDK's sideband connection, read as raw JSON as well as typed events."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.seen: list[dict[str, Any]] = []

    async def next(self, kind: str, timeout_s: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.connection.recv_bytes()
                event: dict[str, Any] = json.loads(raw)
                self.seen.append(event)
                typed = self.connection.parse_event(raw)  # the SDK's own model of it
                assert typed.type == event["type"]
                if event["type"] == kind:
                    return event


@pytest.mark.timeout_s(90)
async def test_the_python_sdk_creates_steers_and_hangs_up_a_call(stack: Stack) -> None:
    server = _client(stack, API_KEY)
    secret = await server.realtime.client_secrets.create(
        session={"type": "realtime", "instructions": "repeat after me"}
    )
    assert secret.value.startswith("ek_")
    assert secret.session.type == "realtime"

    # The caller's side holds only the ek_ and posts its offer through the SDK.
    speaker = ScriptedSpeaker()
    pc = RTCPeerConnection()
    pc.addTrack(speaker)
    channel = pc.createDataChannel("oai-events")
    inbox = Inbox()
    channel.on("message", inbox.add)
    closed = asyncio.Event()
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState == "closed":
            closed.set()

    try:
        await pc.setLocalDescription(await pc.createOffer())
        browser = _client(stack, secret.value)
        raw = await browser.realtime.calls.with_raw_response.create(sdp=pc.localDescription.sdp)
        assert raw.http_response.status_code == 201
        call_id = raw.headers["location"].rsplit("/", 1)[1]
        await pc.setRemoteDescription(RTCSessionDescription(raw.text, "answer"))
        async with asyncio.timeout(10):
            await connected.wait()

        async with server.realtime.connect(call_id=call_id) as connection:
            sideband = Sideband(connection)
            created = await sideband.next("session.created")
            assert created["session"]["type"] == "realtime"
            assert created["session"]["instructions"] == "repeat after me"  # the ek_'s binding
            detection = created["session"]["audio"]["input"]["turn_detection"]
            assert detection["silence_duration_ms"] == 700  # the echo agent's default

            # The server retunes the agent: a 1 s pause no longer ends the caller's turn.
            await connection.session.update(
                session={
                    "type": "realtime",
                    "audio": {
                        "input": {
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}
                        }
                    },
                }
            )
            updated = await sideband.next("session.updated")
            assert updated["session"]["audio"]["input"]["turn_detection"] == {
                **detection,
                "silence_duration_ms": 1500,
            }
            speaker.say(np.concatenate([tone(1.0), silence(1.0), tone(1.0), silence(2.5)]))
            started = await sideband.next("input_audio_buffer.speech_started")
            stopped = await sideband.next("input_audio_buffer.speech_stopped")
            assert stopped["audio_end_ms"] - started["audio_start_ms"] >= 2800  # one turn
            response = await sideband.next("response.created")
            playing = await sideband.next("output_audio_buffer.started")
            assert playing["response_id"] == response["response"]["id"]
            done = await sideband.next("response.done")
            assert done["response"]["status"] == "completed"
            await sideband.next("output_audio_buffer.stopped", 15)
            # Every event has its own id, and the caller's data channel gets the same ones
            # (all but the sideband's own session.created snapshot).
            ids = [e["event_id"] for e in sideband.seen]
            assert len(set(ids)) == len(ids)
            await inbox.until(lambda seen: {e["event_id"] for e in seen} >= set(ids[1:]), 5)

            hung_up_at = time.monotonic()
            await server.realtime.calls.hangup(call_id)
            async with asyncio.timeout(5):
                await closed.wait()
            closed_after_s = time.monotonic() - hung_up_at
            print(f"hangup -> caller's connection closed: {closed_after_s * 1000:.0f} ms")
            assert closed_after_s < 1.0
            with pytest.raises(openai.BadRequestError) as again:
                await server.realtime.calls.hangup(call_id)
            assert again.value.code == "call_not_active"
            assert again.value.status_code == 400
    finally:
        await pc.close()
