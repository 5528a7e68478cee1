"""N (CONCURRENT_SESSIONS, 20 by default) concurrent sessions through one relay to the one
internal UDP port; then every one
closes once, the mux is empty and every peer connection is garbage (no leaks). Runs alone
(tags = ["exclusive"]): 40 aiortc peers share this one test process."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import weakref

import pytest

from services.transceiver.testkit import Client, Stack, closed_reason, wait_for
from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2 as pb

CR = common_pb2
# How many sessions run at once; the BUILD file runs this test with 20 and with 10.
N = int(os.environ.get("CONCURRENT_SESSIONS", "20"))


@pytest.mark.timeout_s(180)
async def test_concurrent_sessions_on_one_port_then_nothing_leaks() -> None:
    # 40 peers (both ends) in one test process: the bridge returns events, not audio, so
    # the loop is not the bottleneck here; audio both ways is e2e_test's job.
    stack = await Stack.start(max_sessions=N)
    stack.bridge.echo = False
    # Clients send tone (for up to 60 s: on a loaded machine the last sessions may take
    # seconds to open their bridge streams) and count, not decode, what they receive: 40
    # peers in one process must not saturate it (the transceiver's cost is what matters).
    clients = [Client(tone_hz=440.0, tone_frames=3000, decode_audio=False) for _ in range(N)]
    try:
        await asyncio.gather(*(stack.connect(f"s{i:02d}", c) for i, c in enumerate(clients)))
        step = "connect"
        try:
            async with asyncio.timeout(90):
                await asyncio.gather(*(c.connected.wait() for c in clients))
                step = "bridge streams"
                await wait_for(lambda: len(stack.bridge.streams) == N, 60)
                step = "data channels"
                await wait_for(lambda: all(c.channel.readyState == "open" for c in clients), 60)
                for i, client in enumerate(clients):
                    client.channel.send(json.dumps({"type": "ping", "i": i}))
                step = "event echo"
                echoed = await asyncio.gather(*(c.events.get() for c in clients))
                assert [e["i"] for e in echoed] == list(range(N))
                step = "audio in"
                await wait_for(
                    lambda: all(s.audio_in > 0 for s in stack.bridge.streams.values()), 60
                )
                step = "audio out"
                await wait_for(lambda: all(c.packets_received > 50 for c in clients), 60)
        except TimeoutError:
            closed = stack.manager._closed.items()
            raise AssertionError(
                f"timed out at {step}: connected {sum(c.connected.is_set() for c in clients)}/{N}, "
                f"channels open {sum(c.channel.readyState == 'open' for c in clients)}, "
                f"bridge streams {len(stack.bridge.streams)}, mux drops {dict(stack.mux.drops)}, "
                f"relay {stack.relay.forwarded}/{stack.relay.returned}, closed "
                f"{[(k, v.final_info.stats.close_reason) for k, v in closed]}"
            ) from None
        assert stack.mux.session_count == N
        assert stack.mux.bound_addresses == N
        peer_connections = [weakref.ref(s.pc) for s in stack.manager._open.values()]
        # Closed by RPC, all at once: a hang-up's DTLS close_notify is one UDP packet that a
        # burst may drop (then consent expiry ends it 30 s later); lifecycle_test covers it.
        closes = [
            stack.stub.CloseSession(pb.CloseSessionRequest(session_id=f"s{i:02d}"))
            for i in range(N)
        ]
        for response in await asyncio.gather(*closes):
            assert response.session.stats.close_reason == CR.CLOSE_REASON_CLOSE_RPC
        for i in range(N):
            assert await closed_reason(stack, f"s{i:02d}") == CR.CLOSE_REASON_CLOSE_RPC
        assert stack.manager.active == 0
        assert stack.mux.session_count == 0
        assert stack.mux.bound_addresses == 0
        gc.collect()
        alive = [ref for ref in peer_connections if ref() is not None]
        assert not alive, f"{len(alive)} peer connections still referenced after close"
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await stack.stop()
