"""Faults at the transceiver's back end, with real aiortc callers through a framing relay
and a real gRPC echo bridge that is stopped and started again on its port:

- the bridge dies for good: the caller gets an `error` event saying why, then the DTLS close;
  new sessions are refused with UNAVAILABLE while the bridge cannot be reached;
- the bridge restarts within `bridge_reconnect_grace_s`: the call goes on on a new stream;
- drain: every caller is told before its peer connection closes, and every session closes;
- overload: while the event loop runs late, new sessions are refused (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time

import grpc
import grpc.aio
import pytest

from services.transceiver.looplag import LagWindow, overloaded
from services.transceiver.session import Session
from services.transceiver.transceiver_testing import (
    Client,
    EchoBridge,
    Stack,
    closed_reason,
    create_request,
    next_event,
    wait_for,
)
from voiceedge.common.v1 import common_pb2

CR = common_pb2


async def _connected(stack: Stack, session_id: str, client: Client) -> None:
    await stack.connect(session_id, client)
    await next_event(client, "session.created", timeout_s=20)


async def _ending(client: Client, timeout_s: float = 20) -> dict[str, object]:
    """The `error` event a server-ended session sends last, and the close after it."""
    event = await next_event(client, "error", timeout_s=timeout_s)
    async with asyncio.timeout(timeout_s):
        await client.ended.wait()
    error = event["error"]
    assert isinstance(error, dict)
    assert error["type"] == "server_error"
    return error


@pytest.mark.timeout_s(60)
async def test_bridge_death_tells_the_caller_and_refuses_new_sessions() -> None:
    stack = await Stack.start(bridge_reconnect_grace_s=0.5)
    client = Client(pre_encoded=True)
    late = Client(pre_encoded=True)
    try:
        await _connected(stack, "c", client)
        await stack.bridge.stop()
        error = await _ending(client)
        assert error["code"] == "inference_unavailable"
        assert await closed_reason(stack, "c") == CR.CLOSE_REASON_BRIDGE_ERROR
        request = create_request("late", await late.offer(), stack.relay.address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.CreateSession(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in (refused.value.details() or "")
    finally:
        await client.close()
        await late.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_bridge_restart_within_the_grace_window_keeps_the_call() -> None:
    stack = await Stack.start(bridge_reconnect_grace_s=15.0)
    client = Client(pre_encoded=True)
    restarted = EchoBridge()
    try:
        await _connected(stack, "c", client)
        port = int(stack.bridge.address.rpartition(":")[2])
        await stack.bridge.stop()
        await restarted.start(port)
        await wait_for(lambda: "c" in restarted.streams, 20)
        stream = restarted.streams["c"]
        await wait_for(lambda: stream.audio_in > 10, 10)  # caller audio flows again
        client.channel.send(json.dumps({"type": "conversation.item.create", "x": 1}))
        await wait_for(lambda: len(stream.events_in) == 1, 10)  # and client events
        session = stack.manager.find("c")
        assert isinstance(session, Session)
        assert not session.is_closed
        seen = [client.events.get_nowait()["type"] for _ in range(client.events.qsize())]
        assert "error" not in seen, seen
    finally:
        await client.close()
        await stack.stop()
        await restarted.stop()


@pytest.mark.timeout_s(60)
async def test_every_drained_caller_is_told_before_the_close() -> None:
    stack = await Stack.start()
    clients = [Client(pre_encoded=True) for _ in range(3)]
    stopped = False
    try:
        for i, client in enumerate(clients):
            await _connected(stack, f"d{i}", client)
        # Grace 0: the drain timer starts closing every session at once, and the shutdown
        # (SIGTERM's close) overtakes it, as when the grace ends in a real process.
        sessions = [stack.manager.find(f"d{i}") for i in range(3)]
        await stack.manager.drain(0.0)
        await wait_for(lambda: all(isinstance(s, Session) and s.is_closed for s in sessions), 5)
        stop = asyncio.create_task(stack.stop())
        errors = await asyncio.gather(*(_ending(c) for c in clients))
        await stop
        stopped = True
        assert [e["code"] for e in errors] == ["server_shutting_down"] * 3
        for i in range(3):
            assert await closed_reason(stack, f"d{i}") == CR.CLOSE_REASON_DRAINED
            assert stack.bridge.streams[f"d{i}"].end_reason == CR.CLOSE_REASON_DRAINED
    finally:
        for client in clients:
            await client.close()
        if not stopped:
            await stack.stop()


def test_lag_window_median_ignores_one_slow_turn() -> None:
    window = LagWindow(5)
    assert window.median == 0.0
    for lag in (1.0, 2.0, 900.0, 1.0, -3.0):
        window.add(lag)
    assert window.median == 1.0
    assert not overloaded(window.median, 25.0)
    assert overloaded(30.0, 25.0)
    assert not overloaded(1e6, 0.0)  # 0: off


@pytest.mark.timeout_s(60)
async def test_a_late_event_loop_refuses_new_sessions_until_it_recovers() -> None:
    stack = await Stack.start(admission_max_loop_lag_ms=20.0)
    client = Client(pre_encoded=True)
    stop = asyncio.Event()

    async def hog() -> None:
        # CPU work in the loop's own thread, as a saturated transceiver has: each turn 60 ms.
        while not stop.is_set():
            busy_until = time.monotonic() + 0.06
            while time.monotonic() < busy_until:
                pass
            await asyncio.sleep(0)

    hogging = asyncio.create_task(hog())
    try:
        await wait_for(lambda: stack.manager.loop_lag.window.median > 20.0, 20)
        request = create_request("late", await client.offer(), stack.relay.address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.CreateSession(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "event loop" in (refused.value.details() or "")
        stop.set()
        await hogging
        await wait_for(lambda: stack.manager.loop_lag.window.median < 20.0, 20)
        await stack.stub.CreateSession(request, timeout=10)
    finally:
        stop.set()
        await hogging
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_a_busy_process_refuses_new_sessions_until_it_recovers() -> None:
    """The CPU measure: work in another thread (hashing large buffers releases the GIL, as
    codecs do) keeps the process at a core while its loop stays on time; new sessions are
    refused until the work stops."""
    stack = await Stack.start(admission_max_cpu_percent=50.0)
    client = Client(pre_encoded=True)
    stop = threading.Event()

    def burn() -> None:
        data = bytes(1 << 20)
        while not stop.is_set():
            hashlib.sha256(data).digest()

    burner = threading.Thread(target=burn, daemon=True)
    burner.start()
    try:
        await wait_for(lambda: stack.manager.loop_lag.cpu.median > 50.0, 20)
        request = create_request("busy", await client.offer(), stack.relay.address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.CreateSession(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "of a core" in (refused.value.details() or "")
        stop.set()
        await asyncio.to_thread(burner.join, 10)
        await wait_for(lambda: stack.manager.loop_lag.cpu.median < 50.0, 20)
        await stack.stub.CreateSession(request, timeout=10)
    finally:
        stop.set()
        await client.close()
        await stack.stop()
