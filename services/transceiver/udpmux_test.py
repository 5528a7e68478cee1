"""The shared socket: admission by STUN USERNAME + MESSAGE-INTEGRITY (table-driven, pure),
then real UDP on 127.0.0.1: demux by client address, replies to the relay that last sent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from libs.fastio import fastio
from libs.wire import framing, recall, stun
from services.transceiver import udpmux

UFRAG = "SERVERUFRAG1"
PWD = "p" * 32
PASSWORDS = {UFRAG: PWD}


def request(username: str, password: str) -> bytes:
    return stun.binding_request(username, password, os.urandom(12))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (request(f"{UFRAG}:cli1", PWD), (UFRAG, "")),
        (request(f"{UFRAG}:cli1", "q" * 32), (None, udpmux.DROP_BAD_INTEGRITY)),
        (request("OTHER:cli1", PWD), (None, udpmux.DROP_UNKNOWN_UFRAG)),
        (request(f"{UFRAG}", PWD), (None, udpmux.DROP_NO_USERNAME)),
        (b"\x16\xfe\xfd" + bytes(40), (None, udpmux.DROP_NOT_STUN)),
        (b"", (None, udpmux.DROP_NOT_STUN)),
        (
            stun.build(stun.BINDING_SUCCESS, os.urandom(12), [], integrity_key=PWD.encode()),
            (None, udpmux.DROP_NOT_BINDING),
        ),
    ],
    ids=["ok", "bad-integrity", "unknown-ufrag", "no-colon", "dtls", "empty", "response"],
)
def test_admit(payload: bytes, expected: tuple[str | None, str]) -> None:
    assert udpmux.admit(payload, PASSWORDS.get) == expected


class Sink:
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[Any, ...]]] = asyncio.Queue()
        self.lost = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait((data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


class Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[Any, ...]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait((data, addr))


async def open_socket() -> tuple[asyncio.DatagramTransport, Socket]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Socket, local_addr=("127.0.0.1", 0))
    return transport, protocol


async def test_demux_and_reply_to_the_relay_that_last_sent() -> None:
    mux = udpmux.UdpMux()
    address = await mux.start("127.0.0.1", 0)
    relay_a, relay_a_in = await open_socket()
    relay_b, relay_b_in = await open_socket()
    try:
        one = mux.register(UFRAG, PWD, ("203.0.113.7", 3478))
        sink_one = Sink()
        transport_one = mux.transport_for(one, sink_one)
        two = mux.register("SECONDUFRAG", "s" * 32, ("203.0.113.7", 3478))
        sink_two = Sink()
        mux.transport_for(two, sink_two)
        client = ("198.51.100.9", 50000)

        # Garbage and non-STUN from an unknown client are counted drops.
        relay_a.sendto(b"not a frame", address)
        relay_a.sendto(framing.encode(*client, b"\x16\xfe\xfd" + bytes(20)), address)
        forged = request(f"{UFRAG}:cli", "wrong" * 8)
        relay_a.sendto(framing.encode(*client, forged), address)
        good = request(f"{UFRAG}:cli", PWD)
        relay_a.sendto(framing.encode(*client, good), address)
        async with asyncio.timeout(5):
            data, addr = await sink_one.received.get()
        assert data == good
        assert addr == client
        assert mux.drops == {
            udpmux.DROP_BAD_FRAME: 1,
            udpmux.DROP_NOT_STUN: 1,
            udpmux.DROP_BAD_INTEGRITY: 1,
        }
        assert sink_two.received.empty()

        # Once bound, anything from that client address (DTLS, SRTP) goes to the session.
        relay_a.sendto(framing.encode(*client, b"\x17dtls"), address)
        async with asyncio.timeout(5):
            assert (await sink_one.received.get())[0] == b"\x17dtls"

        # Replies go framed to relay A; after relay B carries the client, to relay B.
        transport_one.sendto(b"reply-1", client)
        async with asyncio.timeout(5):
            frame, _ = await relay_a_in.received.get()
        assert framing.decode(frame) == (client[0], client[1], b"reply-1")
        relay_b.sendto(framing.encode(*client, b"\x17more"), address)
        async with asyncio.timeout(5):
            await sink_one.received.get()
        transport_one.sendto(b"reply-2", client)
        async with asyncio.timeout(5):
            frame, _ = await relay_b_in.received.get()
        assert framing.decode(frame)[2] == b"reply-2"
        assert relay_a_in.received.empty()
        assert one.counters.packets_in == 3
        assert one.counters.packets_out == 2

        # Closing the transport unbinds the session and tells aioice the socket is gone.
        transport_one.close()
        async with asyncio.timeout(5):
            await sink_one.lost.wait()
        assert mux.bound_addresses == 0
        assert mux.session_count == 1
        relay_a.sendto(framing.encode(*client, b"\x17late"), address)
        relay_a.sendto(framing.encode(*client, good), address)
        await asyncio.sleep(0.05)  # nothing may arrive; nothing to await for an absence
        assert sink_one.received.empty()
        assert mux.drops[udpmux.DROP_UNKNOWN_UFRAG] == 1
    finally:
        relay_a.close()
        relay_b.close()
        await mux.close()


async def test_register_refuses_a_ufrag_in_use() -> None:
    mux = udpmux.UdpMux()
    mux.register(UFRAG, PWD, ("127.0.0.1", 1))
    with pytest.raises(ValueError, match="already has a session"):
        mux.register(UFRAG, PWD, ("127.0.0.1", 1))


@dataclass
class Rig:
    """A started mux with one registered session and a socket playing the relay."""

    mux: udpmux.UdpMux
    address: tuple[str, int]
    relay: asyncio.DatagramTransport
    relay_in: Socket
    session: udpmux.MuxSession
    sink: Sink
    transport: udpmux.VirtualTransport


@contextlib.asynccontextmanager
async def one_session(control_first: bool = False) -> AsyncIterator[Rig]:
    mux = udpmux.UdpMux(control_first=control_first)
    address = await mux.start("127.0.0.1", 0)
    relay, relay_in = await open_socket()
    try:
        session = mux.register(UFRAG, PWD, ("203.0.113.7", 3478))
        sink = Sink()
        transport = mux.transport_for(session, sink)
        yield Rig(mux, address, relay, relay_in, session, sink, transport)
    finally:
        relay.close()
        await mux.close()


async def test_held_sends_leave_in_one_batch_and_rtp_bypasses_aioice() -> None:
    async with one_session() as rig:
        mux, address, relay, relay_in = rig.mux, rig.address, rig.relay, rig.relay_in
        session, sink, transport = rig.session, rig.sink, rig.transport
        clients = [("198.51.100.9", 50000 + i) for i in range(3)]
        for i, client in enumerate(clients):
            relay.sendto(framing.encode(*client, request(f"{UFRAG}:c{i}", PWD)), address)
            async with asyncio.timeout(5):
                await sink.received.get()
        # RTP (not RTCP) goes to rtp_sink once set; RTCP and the rest still reach aioice.
        rtp_in: list[bytes] = []
        session.rtp_sink = rtp_in.append
        rtp = b"\x80\x6f" + bytes(10) + b"opus"
        rtcp = b"\x80\xc8" + bytes(26)
        relay.sendto(framing.encode(*clients[0], rtp), address)
        relay.sendto(framing.encode(*clients[0], rtcp), address)
        relay.sendto(framing.encode(*clients[0], b"\x80\x6f"), address)  # too short for RTP
        async with asyncio.timeout(5):
            assert (await sink.received.get())[0] == rtcp
            assert (await sink.received.get())[0] == b"\x80\x6f"
        assert rtp_in == [rtp]

        mux.hold()
        for i, client in enumerate(clients):
            transport.sendto(f"tick-{i}".encode(), client)
        assert relay_in.received.empty()  # held until flush
        mux.flush()
        got = []
        async with asyncio.timeout(5):
            for _ in clients:
                got.append(framing.decode((await relay_in.received.get())[0]))
        assert sorted(got) == [(c[0], c[1], f"tick-{i}".encode()) for i, c in enumerate(clients)]
        assert mux.send_batches == 1  # the native extension is built with this target


async def test_ipv4_and_ipv6_clients_stay_apart_once_bound() -> None:
    # A bound IPv4 client's frames skip the decode (matched by their whole header); an
    # IPv6 client whose address starts with the same 4 bytes (198.51.100.9 = c633:6409)
    # differs from that header only in its flags byte, so it never matches it.
    mux = udpmux.UdpMux()
    address = await mux.start("127.0.0.1", 0)
    relay, _ = await open_socket()
    try:
        sinks = {}
        clients = {"v4": ("198.51.100.9", 50000), "v6": ("c633:6409::", 50000)}
        for name, client in clients.items():
            ufrag = f"UFRAG{name.upper()}"
            session = mux.register(ufrag, PWD, ("203.0.113.7", 3478))
            sinks[name] = Sink()
            mux.transport_for(session, sinks[name])
            relay.sendto(framing.encode(*client, request(f"{ufrag}:c", PWD)), address)
            async with asyncio.timeout(5):
                await sinks[name].received.get()
        for round_ in range(2):
            for name, client in clients.items():
                relay.sendto(framing.encode(*client, f"\x17{name}{round_}".encode()), address)
        async with asyncio.timeout(5):
            for name, client in clients.items():
                for round_ in range(2):
                    data, addr = await sinks[name].received.get()
                    assert (data, addr) == (f"\x17{name}{round_}".encode(), client)
        assert mux.bound_addresses == 2
        assert not mux.drops
    finally:
        relay.close()
        await mux.close()


async def test_the_shared_socket_gets_the_large_buffers() -> None:
    # What fastio.set_buffers obtains on this machine (the kernel may cap it) is what the
    # mux's socket must have; Linux's ~200 KiB default dropped packets at 400 sessions.
    reference = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fastio.set_buffers(reference)
    expected = (
        reference.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        reference.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )
    reference.close()
    mux = udpmux.UdpMux()
    assert mux.socket_buffers() == (0, 0)
    await mux.start("127.0.0.1", 0)
    try:
        assert mux.socket_buffers() == expected
    finally:
        await mux.close()


async def test_a_replayed_check_from_a_new_address_does_not_bind_it() -> None:
    mux = udpmux.UdpMux()
    address = await mux.start("127.0.0.1", 0)
    relay, _ = await open_socket()
    try:
        session = mux.register(UFRAG, PWD, ("203.0.113.7", 3478))
        sink = Sink()
        mux.transport_for(session, sink)
        client, attacker = ("198.51.100.9", 50000), ("192.0.2.2", 40000)
        check = request(f"{UFRAG}:cli", PWD)
        relay.sendto(framing.encode(*client, check), address)
        async with asyncio.timeout(5):
            assert (await sink.received.get())[1] == client
        # The same bytes from elsewhere: a replay (valid MAC, seen transaction id).
        relay.sendto(framing.encode(*attacker, check), address)
        # A fresh check from a new address (the client after a NAT rebinding) binds.
        moved = ("198.51.100.9", 50001)
        fresh = request(f"{UFRAG}:cli", PWD)
        relay.sendto(framing.encode(*moved, fresh), address)
        async with asyncio.timeout(5):
            assert await sink.received.get() == (fresh, moved)
        assert mux.drops == {udpmux.DROP_REPLAYED: 1}
        assert session.addresses == {client, moved}
    finally:
        relay.close()
        await mux.close()


@pytest.mark.parametrize("client", [("198.51.100.9", 50000), ("2001:db8::9", 50000)])
async def test_tcp_clients_get_replies_with_the_tcp_flag(client: tuple[str, int]) -> None:
    # An ICE-TCP client (frame flag bit 7): its replies echo the flag, so the relay writes
    # them on its TCP connection; the mux knows it is a TCP client.
    async with one_session() as rig:
        mux, address, relay, relay_in = rig.mux, rig.address, rig.relay, rig.relay_in
        sink, transport = rig.sink, rig.transport
        good = request(f"{UFRAG}:cli", PWD)
        relay.sendto(framing.encode(*client, good, tcp=True), address)
        async with asyncio.timeout(5):
            assert await sink.received.get() == (good, client)
        assert client in mux.tcp_clients
        relay.sendto(framing.encode(*client, b"\x17dtls", tcp=True), address)
        async with asyncio.timeout(5):
            assert (await sink.received.get())[0] == b"\x17dtls"
        transport.sendto(b"reply", client)
        async with asyncio.timeout(5):
            frame, _ = await relay_in.received.get()
        assert frame == framing.encode(*client, b"reply", tcp=True)
        transport.close()
        assert client not in mux.tcp_clients


async def test_a_recall_hello_is_answered_with_the_clients_of_that_relay_host() -> None:
    """A relay worker that restarted without bindings greets the mux (libs/wire/recall.py):
    the answer lists the UDP clients last heard through that host, each proven with its
    session's password and the hello's nonce; a repeat within HELLO_INTERVAL_S is not
    answered, a malformed hello is a counted drop."""
    async with one_session() as rig:
        mux, address, relay, relay_in = rig.mux, rig.address, rig.relay, rig.relay_in
        client = ("198.51.100.9", 50000)
        relay.sendto(framing.encode(*client, request(f"{UFRAG}:cli", PWD)), address)
        async with asyncio.timeout(5):
            await rig.sink.received.get()

        nonce = bytes(range(16))
        relay.sendto(recall.encode_hello(nonce), address)
        relay.sendto(recall.encode_hello(nonce), address)  # within the interval: ignored
        relay.sendto(b"VC\x01\x01short", address)
        async with asyncio.timeout(5):
            data, _ = await relay_in.received.get()
        got, [entry] = recall.decode_announce(data)
        assert got == nonce
        assert entry.header == framing.header(*client)
        assert entry.ufrag == UFRAG
        assert recall.verify(entry, PWD, nonce)
        for _ in range(500):  # 5 s at most
            if mux.drops[udpmux.DROP_BAD_RECALL]:
                break
            await asyncio.sleep(0.01)
        assert mux.drops[udpmux.DROP_RECALL_RATE] == 1
        assert mux.recall_answers == 1
        assert relay_in.received.empty()


async def test_a_check_queued_behind_a_media_burst_is_answered_before_the_media() -> None:
    """STUN ahead of media: a burst of RTP and then one consent check, all queued in the
    socket before the mux reads it (as when the loop is behind). The check is handed to
    aioice, and its answer sent, before any of the burst is processed."""
    async with one_session(control_first=True) as rig:
        mux, address, session = rig.mux, rig.address, rig.session
        client = ("198.51.100.9", 50000)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        try:
            sender.sendto(framing.encode(*client, request(f"{UFRAG}:cli", PWD)), address)
            async with asyncio.timeout(5):
                await rig.sink.received.get()
            order: list[str] = []
            burst = 200

            def answer(data: bytes, addr: tuple[Any, ...]) -> None:
                order.append("stun")
                rig.transport.sendto(b"answer:" + data[8:20], addr)  # as aioice answers

            rig.sink.datagram_received = answer  # type: ignore[method-assign]
            session.rtp_sink = lambda _payload: order.append("rtp")
            rtp = b"\x80\x6f" + bytes(10) + b"opus"
            # Blocking sends with no await between them: the mux cannot read in between.
            for _ in range(burst):
                sender.sendto(framing.encode(*client, rtp), address)
            check = request(f"{UFRAG}:cli", PWD)
            sender.sendto(framing.encode(*client, check), address)
            for _ in range(500):  # 5 s at most
                if len(order) == burst + 1:
                    break
                await asyncio.sleep(0.01)
            # The answer went to the relay that last sent: this socket (already queued).
            sender.settimeout(5)
            assert framing.decode(sender.recv(2048))[2] == b"answer:" + check[8:20]
            assert order == ["stun"] + ["rtp"] * burst
            assert mux.drops == {}
        finally:
            sender.close()


def test_media_is_told_apart_from_control_by_its_first_byte() -> None:
    # RFC 7983 §7: STUN 0-3, DTLS 20-63, RTP/RTCP 128-191.
    cases = {b"\x00\x01": False, b"\x17\xfe": False, b"\x80\x6f": True, b"\xbf": True}
    cases |= {b"\xc0": False, b"": False, b"\x7f": False}
    assert {data: udpmux.is_media(data) for data in cases} == cases
