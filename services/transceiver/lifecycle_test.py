"""Session lifecycle and the gRPC contract: every end (ICE timeout, client hang-up, bridge
end, close RPC, drain) happens once with its reason; refusals carry the right status;
a relay restart is survived, a relay gone for good is consent loss. (20 concurrent
sessions: concurrency_test.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from services.transceiver.session import Session
from services.transceiver.transceiver_testing import (
    Client,
    FramingRelay,
    Stack,
    closed_reason,
    create_request,
    rms,
    wait_for,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2
from voiceedge.transceiver.v1 import transceiver_pb2 as pb

CR = common_pb2


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


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
        stack.relay = await FramingRelay.start(stack.mux.address, port=port)
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


# The engine settings' case ends within seconds, not the default 30: they reach aioice.
@pytest.mark.parametrize(
    ("engine", "within_s"),
    [({}, 75), ({"consent_interval_s": 0.25, "consent_expiry_s": 2.0}, 15)],
    ids=["defaults", "engine_settings"],
)
@pytest.mark.timeout_s(90)
async def test_consent_loss_when_the_client_goes_silent(
    engine: dict[str, float], within_s: float
) -> None:
    """The relay dies and nothing replaces it: the client's packets stop reaching us and
    our consent checks (RFC 7675, every ~5 s by default) expire after ~30 s. No reconnect
    grace: consent loss ends the session at once (ice_restart_test.py has the grace)."""
    stack = await Stack.start(**engine, reconnect_grace_s=0.0)
    client = Client(tone_hz=440.0, tone_frames=50, decode_audio=False)
    try:
        await stack.connect("c", client)
        async with asyncio.timeout(10):
            await stack.bridge.opened.wait()
        await stack.relay.close()
        session = stack.manager.find("c")
        assert isinstance(session, Session)
        async with asyncio.timeout(within_s):
            await session.wait_closed()
        assert await closed_reason(stack, "c") == CR.CLOSE_REASON_CONSENT_LOST
        async with asyncio.timeout(5):
            await stack.bridge.streams["c"].ended.wait()
        assert stack.bridge.streams["c"].end_reason == CR.CLOSE_REASON_CONSENT_LOST
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_shutdown_tells_the_bridge_on_the_batched_stream() -> None:
    stack = await Stack.start()
    clients = [Client(pre_encoded=True) for _ in range(3)]
    stopped = False
    try:
        for i, client in enumerate(clients):
            await stack.connect(f"d{i}", client)
        await wait_for(lambda: len(stack.bridge.streams) == 3, 20)
        assert stack.manager.bridges.batched_for(stack.bridge.address).batches_out > 0
        await stack.manager.shutdown()  # what SIGTERM's last step does
        stopped = True
        for i in range(3):
            stream = stack.bridge.streams[f"d{i}"]
            assert stream.end_reason == CR.CLOSE_REASON_DRAINED, f"d{i}"
    finally:
        for client in clients:
            await client.close()
        if not stopped:
            await stack.manager.shutdown()
        await stack.channel.close(None)
        await stack.grpc_service.close()
        await stack.relay.close()
        await stack.bridge.stop()
