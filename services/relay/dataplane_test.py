"""The real data plane on loopback: a fake transceiver (plain UDP socket) receives exactly
the framed packets of valid clients, replies reach the client from the public address, and
random datagrams never reach the transceiver."""

from __future__ import annotations

import asyncio
import contextlib

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from libs.wire import framing, stun, ufrag
from services.relay.relay_testing import (
    KEYS,
    address_of,
    data_plane,
    recv,
    recv_until_quiet,
    udp_socket,
)
from services.relay.router import binding_request_for
from voiceedge.relay.v1 import relay_pb2

SRTP = bytes([0x80, 0x6F]) + bytes(range(100))
DTLS = bytes([22, 0xFE, 0xFD]) + bytes(30)


def _name(sock: object) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]  # type: ignore[attr-defined]
    return str(host), int(port)


@pytest.mark.parametrize("native_path", ["on", "off"])
@pytest.mark.parametrize("batched_io", [True, False])
async def test_valid_clients_reach_the_transceiver_and_nothing_else(
    batched_io: bool, native_path: str
) -> None:
    with contextlib.ExitStack() as stack:
        transceiver = stack.enter_context(udp_socket())
        good, bad, other = (stack.enter_context(udp_socket()) for _ in range(3))
        media = _name(transceiver)
        async with data_plane(
            [f"1/1={media[0]}:{media[1]}"], batched_io=batched_io, native_path=native_path
        ) as plane:
            vip = address_of(plane.public_addresses[0])
            internal = address_of(plane.internal_address)
            request, _ = binding_request_for(KEYS, 1, 1)
            forged = stun.binding_request(
                f"{ufrag.mint(ufrag.Keyring.parse('1:' + '33' * 32), 1, 1)}:x", "p" * 32, b"t" * 12
            )
            bad.sendto(forged, vip)
            bad.sendto(SRTP, vip)
            other.sendto(b"\xff" * 50, vip)
            good.sendto(request, vip)
            good.sendto(DTLS, vip)
            good.sendto(SRTP, vip)
            frames = await recv_until_quiet(transceiver, 0.3)
            client = _name(good)
            assert frames == [framing.encode(*client, p) for p in (request, DTLS, SRTP)]

            # The transceiver replies framed to the internal socket; the client gets the bare
            # payload from the public address it talks to.
            transceiver.sendto(framing.encode(*client, b"\x01\x01" + bytes(18)), internal)
            data, source = await recv(good)
            assert data == b"\x01\x01" + bytes(18)
            assert source == vip
            # A stranger posing as a transceiver reaches nobody.
            other.sendto(framing.encode(*client, SRTP), internal)
            assert await recv_until_quiet(good, 0.2) == []
            drops = plane.router.counters().drop_packets
            assert drops[0][relay_pb2.DROP_REASON_BAD_MAC] == 1
            assert drops[0][relay_pb2.DROP_REASON_NO_BINDING] == 1
            assert drops[0][relay_pb2.DROP_REASON_UNKNOWN_CLASS] == 1
            assert drops[1][relay_pb2.DROP_REASON_UNKNOWN_SOURCE] == 1


@pytest.mark.parametrize("native_path", ["on", "off"])
@pytest.mark.parametrize("batched_io", [True, False])
async def test_ipv6_vip(batched_io: bool, native_path: str) -> None:
    import socket

    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.setblocking(False)
    except OSError:
        # Loopback IPv6 is configured on every machine this project supports; if a
        # container lacks it, the test says so rather than passing vacuously.
        raise AssertionError("IPv6 loopback ::1 is unavailable on this machine") from None
    with contextlib.ExitStack() as stack:
        stack.callback(probe.close)
        transceiver = stack.enter_context(udp_socket())
        media = _name(transceiver)
        async with data_plane(
            [f"1/1={media[0]}:{media[1]}"],
            udp_listen=("[::1]:0",),
            batched_io=batched_io,
            native_path=native_path,
        ) as plane:
            vip = address_of(plane.public_addresses[0])
            request, _ = binding_request_for(KEYS, 1, 1)
            probe.sendto(request, vip)
            frame, _ = await recv(transceiver)
            client = probe.getsockname()[:2]
            assert frame == framing.encode(client[0], client[1], request)
            transceiver.sendto(
                framing.encode(client[0], client[1], SRTP), address_of(plane.internal_address)
            )
            data, _ = await recv(probe)
            assert data == SRTP


@pytest.mark.parametrize("native_path", ["on", "off"])
@pytest.mark.parametrize("batched_io", [True, False])
async def test_replies_leave_from_the_vip_each_client_talks_to(
    batched_io: bool, native_path: str
) -> None:
    with contextlib.ExitStack() as stack:
        transceiver = stack.enter_context(udp_socket())
        media = _name(transceiver)
        first, second = (stack.enter_context(udp_socket()) for _ in range(2))
        async with data_plane(
            [f"1/1={media[0]}:{media[1]}"],
            udp_listen=("127.0.0.1:0", "127.0.0.1:0"),
            batched_io=batched_io,
            native_path=native_path,
        ) as plane:
            vips = [address_of(a) for a in plane.public_addresses]
            assert vips[0] != vips[1]
            internal = address_of(plane.internal_address)
            for client, vip in ((first, vips[1]), (second, vips[0])):
                client.sendto(binding_request_for(KEYS, 1, 1)[0], vip)
                await recv(transceiver)
            for client in (first, second):
                transceiver.sendto(framing.encode(*_name(client), SRTP), internal)
            assert await recv(first) == (SRTP, vips[1])
            assert await recv(second) == (SRTP, vips[0])


datagrams = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.binary(min_size=19, max_size=120).map(lambda b: b"\x00\x01" + b),  # STUN-ish
        st.binary(max_size=120).map(lambda b: b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b),
        st.binary(max_size=200).map(lambda b: b"\x80" + b),  # SRTP-ish
        st.binary(max_size=200).map(lambda b: b"\x16\xfe\xfd" + b),  # DTLS-ish
        st.binary(max_size=200).map(lambda b: b"VE\x01\x00" + b),  # frame-ish
    ),
    max_size=40,
)


async def _fuzz_once(payloads: list[bytes], batched_io: bool, native_path: str) -> None:
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    with contextlib.ExitStack() as stack:
        transceiver = stack.enter_context(udp_socket())
        attacker, marker = (stack.enter_context(udp_socket()) for _ in range(2))
        media = _name(transceiver)
        async with data_plane(
            [f"1/1={media[0]}:{media[1]}"], batched_io=batched_io, native_path=native_path
        ) as plane:
            vip = address_of(plane.public_addresses[0])
            internal = address_of(plane.internal_address)
            for payload in payloads:
                attacker.sendto(payload, vip)
                attacker.sendto(payload, internal)
            # Loopback delivery is in order into the relay's queue: once the marker's frame
            # arrives, every fuzz datagram before it has been routed.
            request, _ = binding_request_for(KEYS, 1, 1)
            marker.sendto(request, vip)
            frame, _ = await recv(transceiver)
            assert frame == framing.encode(*_name(marker), request)
            router = plane.router
            assert router.packets_forwarded == 1
            assert router.packets_dropped == 2 * len(payloads)
    assert errors == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams, st.booleans(), st.sampled_from(["on", "off"]))
def test_fuzz_random_datagrams_never_reach_the_transceiver(
    payloads: list[bytes], batched_io: bool, native_path: str
) -> None:
    asyncio.run(_fuzz_once(payloads, batched_io, native_path))


async def test_oversized_datagram_is_dropped_not_cut() -> None:
    with contextlib.ExitStack() as stack:
        transceiver, client = (stack.enter_context(udp_socket()) for _ in range(2))
        media = _name(transceiver)
        async with data_plane([f"1/1={media[0]}:{media[1]}"]) as plane:
            vip = address_of(plane.public_addresses[0])
            request, _ = binding_request_for(KEYS, 1, 1)
            client.sendto(request, vip)
            await recv(transceiver)
            client.sendto(bytes([0x80]) + bytes(4000), vip)  # SRTP-class, too long
            client.sendto(SRTP, vip)
            frame, _ = await recv(transceiver)
            assert frame == framing.encode(*_name(client), SRTP)
            assert plane.router.packets_dropped == 1
