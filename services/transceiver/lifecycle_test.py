"""Session lifecycle and the gRPC contract: every end (ICE timeout, client hang-up, bridge
end, close RPC, drain) happens once with its reason; refusals carry the right status;
20 concurrent sessions share the one port; nothing leaks; a relay restart is survived."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from services.transceiver.session import Session
from services.transceiver.testkit import Client, Stack, TestRelay, create_request, rms
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2
from voiceedge.transceiver.v1 import transceiver_pb2 as pb

CR = common_pb2


async def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    """Polls a cheap in-memory condition every 10 ms, bounded in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def closed_reason(stack: Stack, session_id: str) -> int:
    session = stack.manager.find(session_id)
    if isinstance(session, Session):
        async with asyncio.timeout(10):
            await session.wait_closed()
    info = await stack.manager.find(session_id).info()
    assert info.state == pb.SESSION_STATE_CLOSED
    return int(info.stats.close_reason)


async def test_refusals_carry_status_and_say_what_is_wrong() -> None:
    stack = await Stack.start(max_sessions=2)
    client = Client()
    try:
        offer = await client.offer()
        relay = stack.relay.address
        code, details = await status_of(
            stack.stub.CreateSession(create_request("g", "not sdp", relay))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "offer_sdp" in details
        bad = create_request("g", offer, relay)
        bad.ice_ufrag = "no"
        code, details = await status_of(stack.stub.CreateSession(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "ice_ufrag: length 2" in details
        no_relay = create_request("g", offer, relay)
        del no_relay.relay_endpoints[:]
        code, details = await status_of(stack.stub.CreateSession(no_relay))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "relay_endpoints" in details

        await stack.stub.CreateSession(create_request("a", offer, relay))
        code, _ = await status_of(stack.stub.CreateSession(create_request("a", offer, relay)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        await stack.stub.CreateSession(create_request("b", offer, relay))
        code, details = await status_of(stack.stub.CreateSession(create_request("c", offer, relay)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions" in details
        code, _ = await status_of(stack.stub.GetSession(pb.GetSessionRequest(session_id="zz")))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = await status_of(stack.stub.CloseSession(pb.CloseSessionRequest(session_id="zz")))
        assert code == grpc.StatusCode.NOT_FOUND

        listed = await stack.stub.ListSessions(pb.ListSessionsRequest(page_size=1))
        assert [s.session_id for s in listed.sessions] == ["a"]
        assert listed.next_page_token
        rest = await stack.stub.ListSessions(
            pb.ListSessionsRequest(page_size=1, page_token=listed.next_page_token)
        )
        assert [s.session_id for s in rest.sessions] == ["b"]
        assert rest.next_page_token == ""
        assert rest.sessions[0].state == pb.SESSION_STATE_NEW

        drained = await stack.stub.Drain(pb.DrainRequest(grace_period_ms=60000))
        assert drained.active_sessions == 2
        await stack.stub.CloseSession(pb.CloseSessionRequest(session_id="a"))
        code, details = await status_of(stack.stub.CreateSession(create_request("d", offer, relay)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "draining" in details
        # A second Drain shortens the grace period: "b" closes as DRAINED.
        await stack.stub.Drain(pb.DrainRequest(grace_period_ms=100))
        assert await closed_reason(stack, "b") == CR.CLOSE_REASON_DRAINED
        assert await closed_reason(stack, "a") == CR.CLOSE_REASON_CLOSE_RPC
    finally:
        await client.close()
        await stack.stop()


async def test_ice_timeout_closes_the_session_once() -> None:
    stack = await Stack.start()
    client = Client()
    try:
        request = create_request("t", await client.offer(), stack.relay.address)
        request.options.ice_timeout_ms = 300
        await stack.stub.CreateSession(request)  # the client never gets the answer
        assert await closed_reason(stack, "t") == CR.CLOSE_REASON_ICE_TIMEOUT
        assert "t" not in stack.bridge.streams
        assert stack.mux.session_count == 0
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_client_hangup_and_bridge_end_each_close_once() -> None:
    stack = await Stack.start()
    hangs_up = Client()
    bridge_ends = Client()
    try:
        await stack.connect("hangup", hangs_up)
        await stack.connect("bridge", bridge_ends)
        await wait_for(lambda: {"hangup", "bridge"} <= set(stack.bridge.streams))

        await hangs_up.close()
        assert await closed_reason(stack, "hangup") == CR.CLOSE_REASON_CLIENT_HANGUP
        async with asyncio.timeout(5):
            await stack.bridge.streams["hangup"].ended.wait()
        assert stack.bridge.streams["hangup"].end_reason == CR.CLOSE_REASON_CLIENT_HANGUP

        end = inference_pb2.SessionEnd(reason=CR.CLOSE_REASON_BRIDGE_ENDED, detail="bye")
        stack.bridge.streams["bridge"].inject.put_nowait(
            inference_pb2.StreamSessionResponse(session_end=end)
        )
        assert await closed_reason(stack, "bridge") == CR.CLOSE_REASON_BRIDGE_ENDED
        # Later ends do not overwrite the first reason.
        closed = await stack.stub.CloseSession(pb.CloseSessionRequest(session_id="bridge"))
        assert closed.session.stats.close_reason == CR.CLOSE_REASON_BRIDGE_ENDED
        assert stack.mux.session_count == 0
        assert stack.mux.bound_addresses == 0
    finally:
        await hangs_up.close()
        await bridge_ends.close()
        await stack.stop()


@pytest.mark.timeout_s(120)
async def test_twenty_concurrent_sessions_on_one_port_then_nothing_leaks() -> None:
    # 40 peers (both ends) in one test process: the bridge returns events, not audio, so
    # the loop is not the bottleneck here; audio both ways is e2e_test's job.
    stack = await Stack.start(max_sessions=20)
    stack.bridge.echo = False
    clients = [Client(tone_hz=440.0) for _ in range(20)]
    try:
        await asyncio.gather(*(stack.connect(f"s{i:02d}", c) for i, c in enumerate(clients)))
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(c.connected.wait() for c in clients))
                await wait_for(lambda: len(stack.bridge.streams) == 20, 30)
                await wait_for(lambda: all(c.channel.readyState == "open" for c in clients), 30)
                for i, client in enumerate(clients):
                    client.channel.send(json.dumps({"type": "ping", "i": i}))
                echoed = await asyncio.gather(*(c.events.get() for c in clients))
                assert [e["i"] for e in echoed] == list(range(20))
                await wait_for(lambda: all(s.audio_in > 0 for s in stack.bridge.streams.values()))
        except TimeoutError:
            closed = stack.manager._closed.items()
            raise AssertionError(
                f"connected {sum(c.connected.is_set() for c in clients)}/20, "
                f"channels open {sum(c.channel.readyState == 'open' for c in clients)}, "
                f"bridge streams {len(stack.bridge.streams)}, mux drops {dict(stack.mux.drops)}, "
                f"relay {stack.relay.forwarded}/{stack.relay.returned}, closed "
                f"{[(k, v.final_info.stats.close_reason) for k, v in closed]}"
            ) from None
        assert stack.mux.session_count == 20
        assert stack.mux.bound_addresses == 20
        peer_connections = [weakref.ref(s.pc) for s in stack.manager._open.values()]
        await asyncio.gather(*(c.close() for c in clients))
        for i in range(20):
            assert await closed_reason(stack, f"s{i:02d}") == CR.CLOSE_REASON_CLIENT_HANGUP
        assert stack.manager.active == 0
        assert stack.mux.session_count == 0
        assert stack.mux.bound_addresses == 0
        gc.collect()
        alive = [ref for ref in peer_connections if ref() is not None]
        assert not alive, f"{len(alive)} peer connections still referenced after close"
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_call_survives_a_relay_restart() -> None:
    stack = await Stack.start()
    client = Client(tone_hz=440.0)
    try:
        await stack.connect("r", client)
        async with asyncio.timeout(10):
            await client.got_audio.wait()
        port = stack.relay.address[1]
        await stack.relay.close()
        stack.relay = await TestRelay.start(stack.mux.address, port=port)
        mark = len(client.frames)
        await wait_for(lambda: len(client.frames) >= mark + 100)
        # Audio flows again through the new relay instance: the transceiver answers the
        # relay that last sent for this client.
        tail = np.concatenate(client.frames[mark + 60 : mark + 100])
        assert rms(tail) > 1000
        assert stack.relay.returned > 0
        session = stack.manager.find("r")
        assert isinstance(session, Session)
        assert not session.is_closed
    finally:
        await client.close()
        await stack.stop()
