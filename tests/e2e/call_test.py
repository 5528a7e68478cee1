"""End to end with aiortc: HTTP offer -> 201 answer whose only candidate is the relay ->
ICE through the relay -> the echo agent's turn comes back -> hang-up leaves nothing behind.

Every service is its own process (the Bazel binaries), talking real gRPC and real UDP on
127.0.0.1; the client is examples/python_client, an independent aiortc peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from examples.grpc_call.create_call import server_side_call
from examples.python_client.client import CallResult, ToneTrack, dominant_frequency, run_call
from tests.e2e.edge import active_sessions, edge, wait_for
from tools.demo.stack import Stack
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

API_KEY = "sk-e2e-0123456789abcdef"
TONE_HZ = 440.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Short idle timeout so the hang-up test can see bindings expire.
    flags = {"relay": ["--idle-timeout-s", "2"]}
    with edge(tmp_path_factory.mktemp("stack"), API_KEY, extra_flags=flags) as running:
        yield running


def _candidates(sdp: str) -> list[tuple[str, int]]:
    found = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            found.append((parts[4], int(parts[5])))
    return found


def _bindings(stack: Stack) -> int:
    with grpc.insecure_channel(stack.grpc("relay")) as channel:
        stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
        return len(stub.ListBindings(relay_pb2.ListBindingsRequest(), timeout=5).bindings)


def _longest_loud_run(audio: np.ndarray, rate: int) -> np.ndarray:
    """The longest stretch of consecutive 20 ms blocks louder than -30 dBFS: the reply."""
    block = rate // 50
    blocks = audio[: len(audio) // block * block].astype(np.float64).reshape(-1, block)
    loud = np.sqrt((blocks**2).mean(axis=1)) > 1000
    best_start, best_len, start = 0, 0, None
    for index, flag in enumerate([*loud.tolist(), False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            if index - start > best_len:
                best_start, best_len = start, index - start
            start = None
    return blocks[best_start : best_start + best_len].reshape(-1)


@pytest.mark.timeout_s(60)
async def test_call_connects_only_through_the_relay(stack: Stack) -> None:
    result = await run_call(stack.http_base, API_KEY, seconds=0.5)
    assert result.status == 201, result.error_body
    assert result.call_url.startswith("/v1/realtime/calls/")
    # One candidate per m-line (audio, data channel), all of them the relay.
    assert set(_candidates(result.answer_sdp)) == {stack.relay_udp}
    assert result.connected
    assert result.remote_candidate == stack.relay_udp


@pytest.mark.timeout_s(90)
async def test_echo_turn_comes_back_at_the_same_frequency(stack: Stack) -> None:
    track = ToneTrack(frequency_hz=TONE_HZ)

    async def speak_then_listen(pc: RTCPeerConnection, result: CallResult) -> None:
        await asyncio.sleep(1.2)  # one utterance (the track is paced in real time)
        track.silent = True
        # The agent answers after the end-of-turn silence.
        assert await result.wait_event("response.done", timeout_s=15), result.event_types()

    result = await run_call(stack.http_base, API_KEY, track=track, during=speak_then_listen)
    assert result.connected
    types = result.event_types()
    assert any("speech_started" in t for t in types), types
    assert any("speech_stopped" in t for t in types), types
    loud = _longest_loud_run(result.audio(), result.received_rate)
    assert len(loud) > result.received_rate // 2, "less than 0.5 s of audible reply"
    heard = dominant_frequency(loud, result.received_rate)
    assert abs(heard - TONE_HZ) < TONE_HZ * 0.05, heard


@pytest.mark.timeout_s(120)
async def test_hang_up_and_call_again_leaves_nothing_behind(stack: Stack) -> None:
    for _ in range(5):
        result = await run_call(stack.http_base, API_KEY, seconds=0.3)
        assert result.connected
    await wait_for("no active transceiver sessions", lambda: active_sessions(stack) == 0, 15)
    await wait_for("relay bindings to expire", lambda: _bindings(stack) == 0, 15)
    assert stack.check_alive() is None


@pytest.mark.timeout_s(60)
async def test_server_side_call_through_the_grpc_api(stack: Stack) -> None:
    call_id = await server_side_call(stack.grpc("signaling"), API_KEY)
    assert call_id.startswith("rtc_")


@pytest.mark.timeout_s(90)
async def test_speaking_during_the_reply_clears_it(stack: Stack) -> None:
    track = ToneTrack(frequency_hz=TONE_HZ)

    async def interrupt(pc: RTCPeerConnection, result: CallResult) -> None:
        await asyncio.sleep(1.2)  # one utterance (the track is paced in real time)
        track.silent = True
        assert await result.wait_event("response.created", timeout_s=15), result.event_types()
        await asyncio.sleep(0.2)  # let the reply play a little: a fixed span of audio
        track.silent = False  # barge in
        await result.wait_event("output_audio_buffer.cleared", timeout_s=10)
        await result.wait_event("response.done", timeout_s=5)  # the cancelled reply

    result = await run_call(stack.http_base, API_KEY, track=track, during=interrupt)
    seen = result.event_types()
    assert "response.created" in seen, seen
    assert "output_audio_buffer.cleared" in seen, seen
    cleared = seen.index("output_audio_buffer.cleared")
    assert seen.index("response.created") < cleared
    done = [e for e in result.events[cleared:] if e.get("type") == "response.done"]
    assert done, seen
    assert done[0]["response"]["status"] == "cancelled"


@pytest.mark.timeout_s(60)
async def test_get_call_follows_the_session(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    states: list[str] = []

    async def get_call(url: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(stack.http_base + url, headers=headers) as response,
        ):
            body: dict[str, Any] = await response.json()
            return body

    async def look(pc: RTCPeerConnection, result: CallResult) -> None:
        states.append((await get_call(result.call_url))["status"])

    result = await run_call(stack.http_base, API_KEY, during=look)
    assert states == ["connected"]
    body = await get_call(result.call_url)
    assert body["status"] == "ended"
    assert body["ended_at"]
