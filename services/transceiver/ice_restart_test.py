"""ICE restart and the reconnect grace: an aiortc client through the framing relay vanishes
(the relay passes nothing), the transceiver's consent expires, and the session is either
picked up again by an ICE restart (same session, DTLS, data channel and bridge stream) or
closed once with client_gone when the grace runs out."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import grpc.aio
import pytest

from libs.wire import ufrag
from services.transceiver.session import Session
from services.transceiver.transceiver_testing import (
    KEYRING,
    Client,
    Stack,
    closed_reason,
    next_event,
    wait_for,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

# Consent expires 2 s into the silence; the vanish lasts 20 s (the figure).
FAST_CONSENT = {"consent_interval_s": 0.5, "consent_expiry_s": 2.0}
VANISH_S = 20.0


async def connected(stack: Stack, client: Client, session_id: str) -> Session:
    await stack.connect(session_id, client)
    async with asyncio.timeout(10):
        await client.connected.wait()
    session = stack.manager.find(session_id)
    assert isinstance(session, Session)
    await wait_for(lambda: session.state == transceiver_pb2.SESSION_STATE_CONNECTED)
    await wait_for(lambda: client.channel.readyState == "open")
    await next_event(client, "session.created")
    return session


@pytest.mark.timeout_s(90)
async def test_a_client_gone_for_20s_restarts_ice_and_keeps_its_session() -> None:
    stack = await Stack.start(**FAST_CONSENT, reconnect_grace_s=30.0)
    client = Client(tone_hz=440.0)
    try:
        session = await connected(stack, client, "s1")
        bridge_stream = stack.bridge.streams["s1"]
        first_ufrag = session.params.ufrag

        stack.relay.blackhole = True
        vanished_at = time.monotonic()
        await wait_for(lambda: session.state == transceiver_pb2.SESSION_STATE_CONNECTING, 15)
        silent_after_s = time.monotonic() - vanished_at
        # The vanish itself is the scenario (a window, not a synchronisation).
        await asyncio.sleep(max(0.0, VANISH_S - (time.monotonic() - vanished_at)))
        assert not session.is_closed
        stack.relay.blackhole = False

        # What a PATCH does: signaling mints a new server ufrag for the same transceiver.
        new_ufrag = ufrag.mint(KEYRING, 1, 1)
        new_pwd = ufrag.password(new_ufrag, KEYRING)
        restart_at = time.monotonic()
        client_ufrag, client_pwd = client.restart_ice(new_ufrag, new_pwd)
        response = await stack.stub.RestartIce(
            transceiver_pb2.RestartIceRequest(
                session_id="s1",
                ice_ufrag=new_ufrag,
                ice_pwd=new_pwd,
                remote_ice_ufrag=client_ufrag,
                remote_ice_pwd=client_pwd,
            ),
            timeout=10,
        )
        assert response.session.ice_ufrag == new_ufrag != first_ufrag
        assert [c.split()[4:6] for c in response.candidates] == [
            [stack.relay.address[0], str(stack.relay.address[1])]
        ]
        await wait_for(lambda: session.state == transceiver_pb2.SESSION_STATE_CONNECTED, 15)
        frames_before = session.frames_in
        await wait_for(lambda: session.frames_in > frames_before + 10, 15)
        resumed_s = time.monotonic() - restart_at
        print(
            f"consent expired {silent_after_s:.2f} s into the silence; "
            f"restart to caller audio flowing again: {resumed_s * 1000:.0f} ms"
        )

        # The same session end to end: the data channel still works, the bridge stream is
        # the one it always was, and the session was never closed.
        update = json.dumps({"type": "session.update", "session": {"instructions": "back"}})
        client.channel.send(update)
        updated = await next_event(client, "session.updated", timeout_s=10)
        assert updated["session"]["instructions"] == "back"
        assert stack.bridge.streams["s1"] is bridge_stream
        await wait_for(lambda: update in bridge_stream.events_in)
        assert not bridge_stream.ended.is_set()
        assert bridge_stream.ends == 0
        assert session.ice_restarts == 1
        assert not session.is_closed
        # The old ufrag admits nothing any more; the new one owns the session.
        info = await session.info()
        assert info.ice_ufrag == new_ufrag
        assert info.stats.close_reason == common_pb2.CLOSE_REASON_UNSPECIFIED
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_a_client_that_never_returns_is_closed_once_as_client_gone() -> None:
    stack = await Stack.start(**FAST_CONSENT, reconnect_grace_s=2.0)
    client = Client(tone_hz=440.0)
    try:
        session = await connected(stack, client, "s2")
        stack.relay.blackhole = True
        assert await closed_reason(stack, "s2", timeout_s=30) == common_pb2.CLOSE_REASON_CLIENT_GONE
        stream = stack.bridge.streams["s2"]
        async with asyncio.timeout(10):
            await stream.ended.wait()
        assert stream.ends == 1
        assert stream.end_reason == common_pb2.CLOSE_REASON_CLIENT_GONE
        assert session.close_detail.startswith("client silent")
        # Closing it again changes nothing: the first cause stays.
        info = await stack.manager.close("s2", common_pb2.CLOSE_REASON_CLOSE_RPC)
        assert info.stats.close_reason == common_pb2.CLOSE_REASON_CLIENT_GONE
        assert stream.ends == 1
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_restart_ice_refusals() -> None:
    stack = await Stack.start()
    client = Client()
    other = Client()
    try:
        await connected(stack, client, "a")
        await connected(stack, other, "b")
        taken = stack.manager.find("b")
        assert isinstance(taken, Session)

        def request(**fields: str) -> transceiver_pb2.RestartIceRequest:
            minted = ufrag.mint(KEYRING, 1, 1)
            values = {
                "session_id": "a",
                "ice_ufrag": minted,
                "ice_pwd": ufrag.password(minted, KEYRING),
                "remote_ice_ufrag": "abcd",
                "remote_ice_pwd": "0123456789012345678901",
            }
            values.update(fields)
            return transceiver_pb2.RestartIceRequest(**values)

        for bad, code in (
            (request(session_id="nope"), grpc.StatusCode.NOT_FOUND),
            (request(remote_ice_pwd="short"), grpc.StatusCode.INVALID_ARGUMENT),  # noqa: S106
            (request(ice_ufrag="bad ufrag!"), grpc.StatusCode.INVALID_ARGUMENT),
            (request(ice_ufrag=taken.params.ufrag), grpc.StatusCode.ALREADY_EXISTS),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stack.stub.RestartIce(bad, timeout=10)
            assert raised.value.code() == code
    finally:
        await client.close()
        await other.close()
        await stack.stop()
