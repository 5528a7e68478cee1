"""The native per-packet path (services/relay/native) on real loopback sockets: its table
follows the router's install/remove, it forwards and counts what it decides, hands the rest
to the router, and the selection falls back when the extension is missing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest

from libs.wire import framing, stun, ufrag
from services.relay import native
from services.relay.limits import Budget
from services.relay.relay_testing import KEYS, address_of, data_plane, recv, recv_until_quiet
from services.relay.relay_testing import udp_socket as udp
from services.relay.router import C2T, T2C, Admission, Binding, binding_request_for
from voiceedge.relay.v1 import relay_pb2

SRTP = bytes([0x80, 0x6F]) + bytes(100)
R = relay_pb2


def _name(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


async def _bind(client: socket.socket, vip: tuple[str, int], transceiver: socket.socket) -> None:
    request, _ = binding_request_for(KEYS, 1, 1)
    client.sendto(request, vip)
    frame, _ = await recv(transceiver)
    assert frame == framing.encode(*_name(client), request)


async def test_bound_media_is_forwarded_in_c_and_follows_unbind() -> None:
    with contextlib.ExitStack() as stack:
        transceiver, client = (stack.enter_context(udp()) for _ in range(2))
        media = _name(transceiver)
        async with data_plane([f"1/1={media[0]}:{media[1]}"], native_path="on") as plane:
            vip = address_of(plane.public_addresses[0])
            await _bind(client, vip, transceiver)
            for _ in range(5):
                client.sendto(SRTP, vip)
            frames = await recv_until_quiet(transceiver, 0.3)
            assert frames == [framing.encode(*_name(client), SRTP)] * 5
            binding = plane.router.get(_name(client))
            assert binding is not None
            counters = plane.router.counters()  # pulls C's counters and activity
            assert counters.fwd_packets[C2T][int(R.PACKET_CLASS_SRTP)] == 5
            assert binding.packets == 6
            assert binding.last_seen == plane.now

            # Unbind through the router: C drops the client's media at once, counted.
            plane.router.forget(_name(client))
            client.sendto(SRTP, vip)
            client.sendto(b"\xff" * 20, vip)
            assert await recv_until_quiet(transceiver, 0.3) == []
            drops = plane.router.counters().drop_packets[C2T]
            assert drops[R.DROP_REASON_NO_BINDING] == 1
            assert drops[R.DROP_REASON_UNKNOWN_CLASS] == 1


async def test_replies_only_from_the_owning_transceiver() -> None:
    with contextlib.ExitStack() as stack:
        transceiver, impostor, client = (stack.enter_context(udp()) for _ in range(3))
        media = _name(transceiver)
        async with data_plane([f"1/1={media[0]}:{media[1]}"], native_path="on") as plane:
            vip = address_of(plane.public_addresses[0])
            internal = address_of(plane.internal_address)
            await _bind(client, vip, transceiver)
            frame = framing.encode(*_name(client), SRTP)
            impostor.sendto(frame, internal)  # handed up: the router counts UNKNOWN_SOURCE
            transceiver.sendto(frame, internal)  # C forwards it
            data, source = await recv(client)
            assert (data, source) == (SRTP, vip)
            assert await recv_until_quiet(client, 0.2) == []
            counters = plane.router.counters()
            assert counters.drop_packets[T2C][R.DROP_REASON_UNKNOWN_SOURCE] == 1
            assert counters.fwd_packets[T2C][int(R.PACKET_CLASS_SRTP)] == 1


async def test_unbound_flood_is_rate_limited_in_c() -> None:
    with contextlib.ExitStack() as stack:
        transceiver, flooder = (stack.enter_context(udp()) for _ in range(2))
        media = _name(transceiver)
        async with data_plane([f"1/1={media[0]}:{media[1]}"], native_path="on") as plane:
            vip = address_of(plane.public_addresses[0])
            for _ in range(1000):  # the default budget: 200/s, burst 400
                flooder.sendto(SRTP, vip)
            drops: tuple[int, ...] = ()
            for _ in range(100):  # until all 1000 are counted (bounded)
                drops = plane.router.counters().drop_packets[C2T]
                if drops[R.DROP_REASON_NO_BINDING] + drops[R.DROP_REASON_RATE_LIMITED] >= 1000:
                    break
                await asyncio.sleep(0.05)
            assert drops[R.DROP_REASON_NO_BINDING] + drops[R.DROP_REASON_RATE_LIMITED] == 1000
            assert drops[R.DROP_REASON_RATE_LIMITED] >= 1000 - 400 - 200
            assert await recv_until_quiet(transceiver, 0.1) == []


SO_NO_CHECK = 11  # socket(7): no UDP checksum on send, which the kernel's GSO refuses


@pytest.mark.parametrize("mode", ["gso", "plain", "refused"])
async def test_runs_to_one_transceiver_go_segmented_and_arrive_whole(mode: str) -> None:
    """Equal-size media of two clients to one transceiver, a shorter packet in between:
    with GSO the runs go as UDP_SEGMENT messages, yet the transceiver receives each framed
    datagram on its own, in order; off, or refused by the kernel (then counted and switched
    off), the same datagrams go plain."""
    with contextlib.ExitStack() as stack:
        transceiver, one, two = (stack.enter_context(udp()) for _ in range(3))
        media = _name(transceiver)
        async with data_plane(
            [f"1/1={media[0]}:{media[1]}"], native_path="on", udp_gso=mode != "plain"
        ) as plane:
            vip = address_of(plane.public_addresses[0])
            await _bind(one, vip, transceiver)
            await _bind(two, vip, transceiver)
            if mode == "refused":
                plane._readers[0].setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            short = SRTP[:40]
            sends = [(one, SRTP), (two, SRTP), (one, SRTP), (two, short), (one, SRTP)]
            sends += [(two, SRTP)] * 3
            for client, data in sends:  # all queued before the core's next read
                client.sendto(data, vip)
            frames = await recv_until_quiet(transceiver, 0.3)
            assert frames == [framing.encode(*_name(c), d) for c, d in sends]
            stats = plane._native.stats() if plane._native else {}
            expected = {
                "gso": (1, 2, 8, 0),  # runs [4 ending with the short one], [4]
                "plain": (0, 0, 0, 0),
                "refused": (0, 0, 0, 1),
            }[mode]
            got = (stats["gso"], stats["gso_messages"], stats["gso_segments"])
            assert (*got, stats["gso_refused"]) == expected
            counters = plane.router.counters()
            assert counters.fwd_packets[C2T][int(R.PACKET_CLASS_SRTP)] == len(sends)
            assert counters.drop_packets[C2T][R.DROP_REASON_SEND_FAILED] == 0


async def test_a_flood_from_many_sources_is_shed_in_c() -> None:
    """Forged Binding requests from 32 source addresses (each within its per-source
    budget) are charged to the worker's verification budget in C: beyond it OVERLOADED,
    counted, never handed to Python; a bad STUN header is MALFORMED in C; nothing reaches
    the transceiver."""
    admission = Admission(verifications=Budget(rate_per_s=1.0, burst=10.0))
    server = ufrag.mint(KEYS, 1, 1)
    with contextlib.ExitStack() as stack:
        transceiver = stack.enter_context(udp())
        flooders = []
        for i in range(32):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((f"127.0.9.{i + 1}", 0))  # every 127/8 address is loopback's
            flooders.append(sock)
        media = _name(transceiver)
        async with data_plane(
            [f"1/1={media[0]}:{media[1]}"], native_path="on", admission=admission
        ) as plane:
            vip = address_of(plane.public_addresses[0])
            for _ in range(10):
                for sock in flooders:
                    # The real ufrag, a wrong password: MESSAGE-INTEGRITY cannot verify.
                    forged = stun.binding_request(f"{server}:cli1", "x" * 22, os.urandom(12))
                    sock.sendto(forged, vip)
                    sock.sendto(b"\x00\x01\x00\x00" + bytes(16), vip)  # no magic cookie
            counted: list[int] = []
            for _ in range(100):  # until all 640 are counted (bounded)
                counted = list(plane.router.counters().drop_packets[C2T])
                if sum(counted) >= 640:
                    break
                await asyncio.sleep(0.05)
            assert sum(counted) == 640, counted
            assert counted[R.DROP_REASON_MALFORMED] == 320
            # At most the burst plus a few seconds' refill reached Python and its HMACs.
            assert counted[R.DROP_REASON_OVERLOADED] >= 320 - 10 - 10
            assert counted[R.DROP_REASON_BAD_MESSAGE_INTEGRITY] <= 20
            assert counted[R.DROP_REASON_RATE_LIMITED] == 0
            assert await recv_until_quiet(transceiver, 0.1) == []
            assert plane.router.counters().bindings_active == 0


def test_table_grows_and_shrinks() -> None:
    module = native.load()
    assert module is not None, "services/relay/native:relaycore.so did not load"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        core = module.Core(sock.fileno(), (sock.fileno(),), bytes(256), bytes(4), 1, 2, 10, False)
        binding = Binding(("10.0.0.1", 1), 1, 1, ("127.0.0.1", 40000), "", 0.0)
        for i in range(5000):
            core.add(f"10.0.{i >> 8}.{i & 255}", 1000 + i, "127.0.0.1", 40000, 0, binding)
        core.add("2001:db8::1", 5, "::1", 40000, 0, binding)
        core.add("10.0.0.0", 1000, "127.0.0.1", 40001, 0, binding)  # an update, not a new one
        assert core.stats()["bindings"] == 5001
        removed = [core.remove(f"10.0.{i >> 8}.{i & 255}", 1000 + i) for i in range(0, 5000, 2)]
        assert all(removed)
        assert not core.remove("10.0.0.0", 1000)
        assert core.stats()["bindings"] == 2501
        with pytest.raises(ValueError, match="not an IP literal"):
            core.add("not-an-ip", 1, "127.0.0.1", 1, 0, binding)
        with pytest.raises(ValueError, match="out of range"):
            core.add("10.0.0.1", 1, "127.0.0.1", 1, 7, binding)  # no public socket 7


def test_selection_falls_back_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.wanted("auto")
    assert native.wanted("on")
    assert not native.wanted("off")
    monkeypatch.setattr(native, "load", lambda: None)
    assert not native.wanted("auto")
    with pytest.raises(ValueError, match="missing"):
        native.wanted("on")
    with pytest.raises(ValueError, match="one of"):
        native.wanted("fast")
