"""ICE-TCP on the relay: RFC 4571 deframing and the connection caps as pure tables, then a
real TcpPlane on loopback with a fake transceiver (plain UDP socket): valid clients reach it
framed with the TCP flag and hear its replies on their connection; every abuse case is
closed with its reason counted and nothing forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from libs.wire import framing, stun, ufrag
from services.relay.relay_testing import KEYS, address_of, recv, recv_until_quiet, udp_socket
from services.relay.router import Router, binding_request_for
from services.relay.tcp import (
    CloseReason,
    ConnectionLimits,
    FrameReader,
    FrameTooLongError,
    TcpLimits,
    TcpPlane,
    close_reason_of,
    frame,
)
from services.relay.topology import static_view
from voiceedge.relay.v1 import relay_pb2

DTLS = bytes([22, 0xFE, 0xFD]) + bytes(30)
SRTP = bytes([0x80, 0x6F]) + bytes(100)
CLOSE_TIMEOUT_S = 10.0


# ---- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"\x00\x03abc"], [b"abc"]),
        ([b"\x00\x03ab", b"c"], [b"abc"]),
        ([b"\x00", b"\x03", b"abc\x00\x01z"], [b"abc", b"z"]),
        ([b"\x00\x00\x00\x01z"], [b"z"]),  # empty frames are skipped
        ([b"\x00\x05abc"], []),  # incomplete: held
    ],
)
def test_frame_reader_splits_the_stream(chunks: list[bytes], expected: list[bytes]) -> None:
    reader = FrameReader(max_frame_bytes=100)
    got = [packet for chunk in chunks for packet in reader.feed(chunk)]
    assert got == expected


def test_frame_reader_refuses_a_long_length_before_its_body() -> None:
    reader = FrameReader(max_frame_bytes=100)
    assert reader.feed(frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(FrameTooLongError):
        reader.feed(b"\x00\x65")  # 101, no body yet


def test_connection_limits() -> None:
    book = ConnectionLimits(
        TcpLimits(max_pending=3, max_pending_per_ip=2, max_open=2, max_open_per_ip=1)
    )
    assert book.admit("10.0.0.1") is None
    assert book.admit("10.0.0.1") is None
    assert book.admit("10.0.0.1") is CloseReason.PENDING_CAP_IP
    assert book.admit("10.0.0.2") is None
    assert book.admit("10.0.0.3") is CloseReason.PENDING_CAP
    assert book.can_open("10.0.0.1") is None
    book.promote("10.0.0.1")
    assert book.can_open("10.0.0.1") is CloseReason.OPEN_CAP_IP
    book.promote("10.0.0.2")
    book.release("10.0.0.1", was_open=False)
    assert book.admit("10.0.0.4") is None
    assert book.can_open("10.0.0.4") is CloseReason.OPEN_CAP
    for ip, was_open in (("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.4", False)):
        book.release(ip, was_open)
    assert (book.pending, book.open, dict(book.pending_by_ip), dict(book.open_by_ip)) == (
        0,
        0,
        {},
        {},
    )


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        (relay_pb2.DROP_REASON_BAD_MAC, CloseReason.BAD_UFRAG),
        (relay_pb2.DROP_REASON_UNKNOWN_TRANSCEIVER, CloseReason.BAD_UFRAG),
        (relay_pb2.DROP_REASON_BAD_MESSAGE_INTEGRITY, CloseReason.BAD_INTEGRITY),
        (relay_pb2.DROP_REASON_NO_BINDING, CloseReason.BAD_FIRST_FRAME),
        (relay_pb2.DROP_REASON_NOT_BINDING_REQUEST, CloseReason.BAD_FIRST_FRAME),
        (relay_pb2.DROP_REASON_DRAINING, CloseReason.DRAINING),
    ],
)
def test_close_reason_of_a_refused_first_frame(drop: int, reason: CloseReason) -> None:
    assert close_reason_of(drop) is reason


# ---- real sockets ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_plane(
    transceiver: socket.socket, limits: TcpLimits
) -> AsyncIterator[tuple[TcpPlane, tuple[str, int]]]:
    media = transceiver.getsockname()
    router = Router(KEYS, static_view([f"1/1={media[0]}:{media[1]}"]), tcp=True)
    plane = TcpPlane(router, limits, listen="127.0.0.1:0", internal_host="127.0.0.1")
    await plane.start()
    try:
        yield plane, address_of(plane.address)
    finally:
        await plane.close()


async def connect(
    address: tuple[str, int],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(*address), CLOSE_TIMEOUT_S)


async def closed_by_relay(reader: asyncio.StreamReader) -> bool:
    """True once the relay closed (EOF or reset) with nothing sent before."""
    try:
        data = await asyncio.wait_for(reader.read(1), CLOSE_TIMEOUT_S)
    except ConnectionResetError:
        return True
    return data == b""


def local_of(writer: asyncio.StreamWriter) -> tuple[str, int]:
    name = writer.get_extra_info("sockname")
    return str(name[0]), int(name[1])


async def test_a_valid_client_reaches_the_transceiver_and_hears_it_framed() -> None:
    with udp_socket() as transceiver:
        async with tcp_plane(transceiver, TcpLimits()) as (plane, address):
            reader, writer = await connect(address)
            request, _ = binding_request_for(KEYS, 1, 1)
            # Split mid-frame on purpose: RFC 4571 frames need not match TCP segments.
            stream = frame(request) + frame(DTLS) + frame(SRTP)
            writer.write(stream[:7])
            await writer.drain()
            writer.write(stream[7:])
            client = local_of(writer)
            frames = [(await recv(transceiver))[0] for _ in range(3)]
            assert frames == [framing.encode(*client, p, tcp=True) for p in (request, DTLS, SRTP)]

            # The reply comes back to the plane's own internal socket, with the TCP flag.
            reply = b"\x01\x01" + bytes(18)
            transceiver.sendto(
                framing.encode(*client, reply, tcp=True), address_of(plane.internal_address)
            )
            got = await asyncio.wait_for(reader.readexactly(2 + len(reply)), CLOSE_TIMEOUT_S)
            assert got == frame(reply)
            counters = plane.counters()
            assert (counters.open, counters.pending, counters.frames_in, counters.frames_out) == (
                1,
                0,
                3,
                1,
            )

            # The client hangs up: its binding goes, later replies reach nobody.
            writer.close()
            await asyncio.wait_for(_until(lambda: plane.counters().open == 0), CLOSE_TIMEOUT_S)
            assert plane.router.get(client) is None
            assert plane.counters().closed[CloseReason.CLIENT_CLOSED] == 1
            transceiver.sendto(
                framing.encode(*client, reply, tcp=True), address_of(plane.internal_address)
            )
            await asyncio.wait_for(
                _until(lambda: plane.router.counters().packets_dropped == 1), CLOSE_TIMEOUT_S
            )


async def _until(condition: object) -> None:
    """Polls a counter the plane updates on its own loop (no event to await); bounded by
    the caller's wait_for."""
    while not condition():  # type: ignore[operator]  # noqa: ASYNC110 (no event to await)
        await asyncio.sleep(0.02)


def _forged_request() -> bytes:
    other = ufrag.Keyring.parse("1:" + "33" * 32)
    return stun.binding_request(f"{ufrag.mint(other, 1, 1)}:x", "p" * 32, b"t" * 12)


def _bad_integrity_request() -> bytes:
    server = ufrag.mint(KEYS, 1, 1)
    return stun.binding_request(f"{server}:cli1", "not-the-password-at-all!", b"u" * 12)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (frame(_forged_request()), CloseReason.BAD_UFRAG),
        (frame(_bad_integrity_request()), CloseReason.BAD_INTEGRITY),
        (frame(DTLS), CloseReason.BAD_FIRST_FRAME),
        (frame(b"\xff" * 40), CloseReason.BAD_FIRST_FRAME),
        (b"\x08\x01", CloseReason.FRAME_TOO_LONG),  # 2049 > 2048, before any body
        (b"", CloseReason.FIRST_FRAME_TIMEOUT),
        (b"\x00\x40half", CloseReason.FIRST_FRAME_TIMEOUT),  # a frame that never completes
    ],
)
async def test_abuse_is_closed_with_its_reason_and_nothing_forwarded(
    first: bytes, reason: CloseReason
) -> None:
    with udp_socket() as transceiver:
        limits = TcpLimits(first_frame_timeout_s=0.5)
        async with tcp_plane(transceiver, limits) as (plane, address):
            reader, writer = await connect(address)
            writer.write(first)
            await writer.drain()
            assert await closed_by_relay(reader)
            writer.close()
            await asyncio.wait_for(
                _until(lambda: plane.counters().closed[reason] == 1), CLOSE_TIMEOUT_S
            )
            assert await recv_until_quiet(transceiver, 0.2) == []
            counters = plane.counters()
            assert (counters.pending, counters.open, sum(counters.closed)) == (0, 0, 1)
            assert len(plane.router) == 0


async def test_pending_and_open_caps_per_ip() -> None:
    with udp_socket() as transceiver:
        limits = TcpLimits(max_pending_per_ip=2, max_open_per_ip=1)
        async with tcp_plane(transceiver, limits) as (plane, address):
            first = [await connect(address) for _ in range(2)]
            await asyncio.wait_for(_until(lambda: plane.counters().pending == 2), CLOSE_TIMEOUT_S)
            refused_reader, refused_writer = await connect(address)
            assert await closed_by_relay(refused_reader)
            refused_writer.close()
            assert plane.counters().closed[CloseReason.PENDING_CAP_IP] == 1

            # One opens; the second valid client from the same IP is over the open cap.
            (_reader_a, writer_a), (reader_b, writer_b) = first
            writer_a.write(frame(binding_request_for(KEYS, 1, 1)[0]))
            await asyncio.wait_for(_until(lambda: plane.counters().open == 1), CLOSE_TIMEOUT_S)
            writer_b.write(frame(binding_request_for(KEYS, 1, 1, "cli2")[0]))
            assert await closed_by_relay(reader_b)
            await asyncio.wait_for(
                _until(lambda: plane.counters().closed[CloseReason.OPEN_CAP_IP] == 1),
                CLOSE_TIMEOUT_S,
            )
            assert len(await recv_until_quiet(transceiver, 0.2)) == 1  # only A's request
            for writer in (writer_a, writer_b):
                writer.close()


async def test_draining_refuses_new_connections_and_keeps_open_ones() -> None:
    with udp_socket() as transceiver:
        async with tcp_plane(transceiver, TcpLimits()) as (plane, address):
            _, writer = await connect(address)
            request, _ = binding_request_for(KEYS, 1, 1)
            writer.write(frame(request))
            await recv(transceiver)
            plane.drain()
            reader, late = await connect(address)
            assert await closed_by_relay(reader)
            late.close()
            assert plane.counters().closed[CloseReason.DRAINING] == 1
            writer.write(frame(SRTP))  # the call in progress keeps forwarding
            assert (await recv(transceiver))[0] == framing.encode(*local_of(writer), SRTP, tcp=True)
            writer.close()
