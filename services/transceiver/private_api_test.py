"""Fails loudly, naming the attribute, if an aiortc/aioice upgrade moves the private
attributes services/transceiver/aiortc_compat.py relies on."""

from __future__ import annotations

import asyncio
from typing import Any

import aioice
import aioice.stun
import aiortc

from services.transceiver import aiortc_compat


async def test_pinned_private_attributes_still_exist() -> None:
    try:
        aiortc_compat.check_versions()
    except aiortc_compat.CompatError as exc:
        raise AssertionError(
            f"aiortc {aiortc.__version__} / aioice {aioice.__version__}: {exc}. "
            "The transceiver forces ICE credentials and shares one UDP socket through these "
            "internals; re-verify aiortc_compat.py against the new versions."
        ) from None


def test_fast_audio_level_matches_aiortc() -> None:
    import fractions

    import av
    import numpy as np

    original = aiortc.rtp.compute_audio_level_dbov
    if original is aiortc_compat.audio_level_dbov:
        raise AssertionError("run before install_fast_audio_level")
    rng = np.random.default_rng(7)
    for layout, amplitude in [("mono", 0), ("mono", 3), ("mono", 3000), ("stereo", 20000)]:
        channels = 2 if layout == "stereo" else 1
        data = (rng.standard_normal(960 * channels) * amplitude).clip(-32768, 32767)
        frame = av.AudioFrame(format="s16", layout=layout, samples=960)
        frame.planes[0].update(data.astype(np.int16).tobytes())
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        assert aiortc_compat.audio_level_dbov(frame) == original(frame), (layout, amplitude)


async def test_forced_credentials_and_installed_protocol_reach_the_answer() -> None:
    pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio")
        (ice,) = aiortc_compat.ice_transports(pc)
        connection = aiortc_compat.connection_of(ice)
        aiortc_compat.set_local_credentials(connection, "UFRAGtoken", "p" * 32)
        assert ice.iceGatherer.getLocalParameters().usernameFragment == "UFRAGtoken"
        assert ice.iceGatherer.getLocalParameters().password == "p" * 32
        offer = await pc.createOffer()
        assert "a=ice-ufrag:UFRAGtoken" in offer.sdp
    finally:
        await pc.close()


def test_pylibsrtp_internals_the_native_rtp_core_uses() -> None:
    # rtpcore.srtp_pointers falls back to the Python RTP path (slower, same behaviour) when
    # these checks fail; fail here instead, so a pylibsrtp/libsrtp upgrade is looked at.
    import os

    import pylibsrtp

    from services.transceiver import rtpcore

    session = pylibsrtp.Session(
        pylibsrtp.Policy(key=os.urandom(30), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    )
    pointers = rtpcore.srtp_pointers(session)
    assert pointers is not None, (
        f"pylibsrtp {pylibsrtp.__version__}: Session._srtp ({rtpcore.SRTP_CONTEXT_TYPE}) or "
        f"lib.srtp_protect/srtp_unprotect ({rtpcore.SRTP_FUNCTION_TYPE}) changed"
    )
    assert all(pointers)


async def test_the_task_index_finds_what_a_scan_of_every_task_finds() -> None:
    # index_pc_tasks (installed by SessionManager) must see every `__connect` aiortc
    # starts, or a session would skip waiting for one (a data-channel race at set-up, a
    # task outliving the session at close).
    import asyncio

    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    aiortc_compat.index_pc_tasks(loop)
    pcs = [aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[])) for _ in range(3)]
    try:
        names = ("RTCPeerConnection.__connect",)
        for pc in pcs:
            pc.addTransceiver("audio")
            await pc.setLocalDescription(await pc.createOffer())
            # setLocalDescription has just started `__connect`: compare before it runs.
            indexed = aiortc_compat._pc_tasks(pc, names)
            scanned = [
                task
                for task in asyncio.all_tasks()
                if not task.done()
                and task.get_coro().__qualname__ in names  # type: ignore[union-attr]
                and aiortc_compat._owner(task.get_coro()) is pc
            ]
            assert indexed
            assert set(indexed) == set(scanned)
    finally:
        for pc in pcs:
            await pc.close()
        for pc in pcs:
            await aiortc_compat.wait_pc_closed(pc)
        assert not any(aiortc_compat._pc_tasks(pc, aiortc_compat._PC_TASK_NAMES) for pc in pcs)
        loop.set_task_factory(previous)
        aiortc_compat._indexed_loops.discard(loop)


class _Sent(asyncio.DatagramTransport):
    """Records what aioice sends; closing it tells the protocol, as a socket would."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, Any]] = []
        self._protocol = protocol

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))

    def close(self) -> None:
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)


async def test_tcp_peers_are_learned_as_tcp_prflx_candidates() -> None:
    # aioice learns every client as a udp peer-reflexive candidate (check_incoming); an
    # ICE-TCP client's becomes tcp, any other stays udp.
    connection = aioice.Connection(ice_controlling=False)
    tcp_client, udp_client = ("198.51.100.9", 50000), ("198.51.100.9", 50001)
    aiortc_compat.install_tcp_peers(connection, {tcp_client}.__contains__)
    protocol = aiortc_compat.make_stun_protocol(connection)
    aiortc_compat.install_protocol(connection, protocol, _Sent(protocol), "203.0.113.7", 3478)
    connection.remote_username, connection.remote_password = "cli1", "c" * 22
    try:
        for client in (tcp_client, udp_client):
            message = aioice.stun.Message(
                message_method=aioice.stun.Method.BINDING,
                message_class=aioice.stun.Class.REQUEST,
            )
            message.attributes["PRIORITY"] = 1845501695
            connection.check_incoming(message, client, protocol)
        learned = {(c.host, c.port): (c.type, c.transport) for c in connection._remote_candidates}
        assert learned == {tcp_client: ("prflx", "tcp"), udp_client: ("prflx", "udp")}
    finally:
        await connection.close()
