"""ICE-TCP on one public TCP port (RFC 6544 passive candidate, RFC 4571 framing).

A browser whose UDP is blocked opens a TCP connection to the relay's public TCP port and
sends RFC 4571 frames (a 2-byte length, then one STUN, DTLS or SRTP packet). The connection
stays *pending* until its first frame is a STUN Binding request whose server ufrag decodes
and whose MESSAGE-INTEGRITY verifies (the same `Router` checks as UDP, on a router of its
own); only then does anything reach a transceiver. From then on every frame goes to the
owning transceiver's internal UDP port in the relay framing with the TCP flag and the
connection's remote address (protos/wire/relay-framing-v1.md), and the transceiver's
replies, which come back to this plane's own internal socket, are written framed on the
connection.

Abuse limits (each closing reason counted in `TcpCounters.closed`): no valid first frame
within `tcp_first_frame_timeout_s`; caps on pending and open connections, per client IP and
in all; a forged or unknown ufrag or a failed integrity check; a frame longer than
`tcp_max_frame_bytes`. Pure parts (`FrameReader`, `ConnectionLimits`, `close_reason_of`)
have no sockets; `TcpPlane` is the thin asyncio part.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from libs.config.settings import join_host_port, parse_host_port
from libs.observability.telemetry import log_event
from libs.wire import ufrag
from libs.wire.framing import Address
from services.relay.router import C2T, T2C, Drop, Forward, Router, make_router
from services.relay.settings import RelaySettings
from services.relay.topology import TopologyView
from voiceedge.relay.v1 import relay_pb2

logger = logging.getLogger("voiceedge.relay.tcp")

LENGTH_BYTES = 2  # RFC 4571 §2: a 16-bit length before each packet
MAX_WRITE_BUFFER_BYTES = 256 * 1024  # a client that stops reading loses packets, not memory
SWEEP_S = 1.0
LISTEN_BACKLOG = 1024


class CloseReason(enum.IntEnum):
    """Why the relay (or the client) ended a TCP connection; one counter each."""

    CLIENT_CLOSED = 0  # the client closed or reset it
    FIRST_FRAME_TIMEOUT = 1  # no valid first frame in time
    BAD_FIRST_FRAME = 2  # first frame not a STUN Binding request with a USERNAME
    BAD_UFRAG = 3  # forged or unknown server ufrag (MAC, key id, cluster, transceiver)
    BAD_INTEGRITY = 4  # MESSAGE-INTEGRITY does not verify with the ufrag's password
    FRAME_TOO_LONG = 5  # an RFC 4571 length above tcp_max_frame_bytes
    PENDING_CAP_IP = 6  # this IP already has tcp_max_pending_per_ip pending connections
    PENDING_CAP = 7  # tcp_max_pending pending connections in all
    OPEN_CAP_IP = 8  # this IP already has tcp_max_open_per_ip open connections
    OPEN_CAP = 9  # tcp_max_open open connections in all
    DRAINING = 10  # the relay is draining: no new clients
    IDLE = 11  # the binding expired (no packets for idle_timeout_s)
    SHUTDOWN = 12  # the relay closed


N_CLOSE_REASONS = len(CloseReason)

# A pending connection's first frame refused by the router -> why it is closed.
_CLOSE_OF_DROP: dict[int, CloseReason] = {
    relay_pb2.DROP_REASON_BAD_UFRAG: CloseReason.BAD_UFRAG,
    relay_pb2.DROP_REASON_BAD_MAC: CloseReason.BAD_UFRAG,
    relay_pb2.DROP_REASON_UNKNOWN_KEY_ID: CloseReason.BAD_UFRAG,
    relay_pb2.DROP_REASON_UNKNOWN_CLUSTER: CloseReason.BAD_UFRAG,
    relay_pb2.DROP_REASON_UNKNOWN_TRANSCEIVER: CloseReason.BAD_UFRAG,
    relay_pb2.DROP_REASON_BAD_MESSAGE_INTEGRITY: CloseReason.BAD_INTEGRITY,
    relay_pb2.DROP_REASON_DRAINING: CloseReason.DRAINING,
}


def close_reason_of(drop_reason: int) -> CloseReason:
    """The close reason for a first frame the router dropped (anything not listed: not a
    Binding request, malformed, DTLS/SRTP before STUN)."""
    return _CLOSE_OF_DROP.get(drop_reason, CloseReason.BAD_FIRST_FRAME)


class FrameTooLongError(ValueError):
    """An RFC 4571 length above the maximum: the stream cannot be trusted further."""


class FrameReader:
    """Splits a TCP byte stream into RFC 4571 packets. Holds at most one partial frame
    (below max_frame_bytes + 2 bytes)."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_frame_bytes: int) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """The complete frames `data` ends; raises FrameTooLongError as soon as a length header
        over the maximum is seen (before its body arrives). Zero-length frames are skipped."""
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= LENGTH_BYTES:  # bounded: every turn consumes >= 2 bytes
            length = (buffer[offset] << 8) | buffer[offset + 1]
            if length > self._max:
                raise FrameTooLongError(f"frame of {length} bytes > {self._max}")
            if end - offset - LENGTH_BYTES < length:
                break
            start = offset + LENGTH_BYTES
            if length:
                frames.append(bytes(buffer[start : start + length]))
            offset = start + length
        if offset:
            del buffer[:offset]
        return frames


def frame(payload: bytes) -> bytes:
    """One RFC 4571 frame (payloads come from transceivers: at most one UDP datagram)."""
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


@dataclass(frozen=True)
class TcpLimits:
    """The abuse limits of one worker's TCP plane (from RelaySettings, `tcp_*`)."""

    first_frame_timeout_s: float = 2.0
    max_frame_bytes: int = 2048
    max_pending: int = 1024
    max_pending_per_ip: int = 8
    max_open: int = 20_000
    max_open_per_ip: int = 256


@dataclass
class ConnectionLimits:
    """Pending and open connection counts per client IP and in all; pure bookkeeping the
    plane asks before accepting or promoting a connection."""

    limits: TcpLimits
    pending: int = 0
    open: int = 0
    pending_by_ip: Counter[str] = field(default_factory=Counter)
    open_by_ip: Counter[str] = field(default_factory=Counter)

    def admit(self, ip: str) -> CloseReason | None:
        """A new connection from `ip`: None (now pending) or why it is refused."""
        if self.pending_by_ip[ip] >= self.limits.max_pending_per_ip:
            return CloseReason.PENDING_CAP_IP
        if self.pending >= self.limits.max_pending:
            return CloseReason.PENDING_CAP
        self.pending += 1
        self.pending_by_ip[ip] += 1
        return None

    def can_open(self, ip: str) -> CloseReason | None:
        """May a pending connection from `ip` become open? None or why not."""
        if self.open_by_ip[ip] >= self.limits.max_open_per_ip:
            return CloseReason.OPEN_CAP_IP
        if self.open >= self.limits.max_open:
            return CloseReason.OPEN_CAP
        return None

    def promote(self, ip: str) -> None:
        self._leave(self.pending_by_ip, ip)
        self.pending -= 1
        self.open += 1
        self.open_by_ip[ip] += 1

    def release(self, ip: str, was_open: bool) -> None:
        if was_open:
            self._leave(self.open_by_ip, ip)
            self.open -= 1
        else:
            self._leave(self.pending_by_ip, ip)
            self.pending -= 1

    @staticmethod
    def _leave(counts: Counter[str], ip: str) -> None:
        counts[ip] -= 1
        if counts[ip] <= 0:
            del counts[ip]  # no entry per IP that has gone: the table stays small


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class TcpCounters:
    """One worker's TCP plane counters, or the sum over workers (`+`)."""

    accepted: int = 0
    pending: int = 0
    open: int = 0
    closed: tuple[int, ...] = (0,) * N_CLOSE_REASONS  # by CloseReason
    frames_in: int = 0  # client -> transceiver, forwarded
    frames_out: int = 0  # transceiver -> client, written
    frames_dropped: int = 0  # refused on an open connection, or the client not reading

    def __add__(self, other: TcpCounters) -> TcpCounters:
        return TcpCounters(
            self.accepted + other.accepted,
            self.pending + other.pending,
            self.open + other.open,
            _add(self.closed, other.closed),
            self.frames_in + other.frames_in,
            self.frames_out + other.frames_out,
            self.frames_dropped + other.frames_dropped,
        )

    def fields(self) -> list[Any]:
        """Flat JSON-able form for the worker pipe (services/relay/messages.py)."""
        return [
            self.accepted,
            self.pending,
            self.open,
            list(self.closed),
            self.frames_in,
            self.frames_out,
            self.frames_dropped,
        ]


class _Connection(asyncio.Protocol):
    """One client TCP connection: pending until its first valid frame, then open."""

    __slots__ = ("_plane", "_reader", "_timer", "closed", "is_open", "peer", "transport")

    def __init__(self, plane: TcpPlane) -> None:
        self._plane = plane
        self._reader = FrameReader(plane.limits.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("", 0)
        self.is_open = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1]))
        self._plane.accept(self)

    def start_timer(self, timeout_s: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            timeout_s, self.close, CloseReason.FIRST_FRAME_TIMEOUT
        )

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self._reader.feed(data)
        except FrameTooLongError:
            self.close(CloseReason.FRAME_TOO_LONG)
            return
        for packet in frames:
            self._plane.client_frame(self, packet)
            if self.is_closed():  # the first frame was refused: drop the rest unread
                return

    def is_closed(self) -> bool:
        return self.closed

    def opened(self) -> None:
        self.is_open = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send(self, payload: bytes) -> bool:
        transport = self.transport
        if self.closed or transport is None:
            return False
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            return False
        transport.write(frame(payload))
        return True

    def close(self, reason: CloseReason) -> None:
        """Idempotent; counts `reason` once."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._plane.forget(self, reason)
        if self.transport is not None:
            self.transport.abort()  # no lingering: a refused client gets nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(CloseReason.CLIENT_CLOSED)


class _Internal(asyncio.DatagramProtocol):
    def __init__(self, plane: TcpPlane) -> None:
        self._plane = plane

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._plane.transceiver_frame(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self._plane.router.count_send_failed(C2T, 0)


def bind_tcp(address: str) -> socket.socket:
    """A listening, non-blocking TCP socket on `host:port` (SO_REUSEPORT: every worker binds
    the same address and the kernel spreads connections)."""
    host, port = parse_host_port(address, "tcp_listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class TcpPlane:
    """One worker's public TCP listener, its router and its internal UDP socket."""

    def __init__(
        self,
        router: Router,
        limits: TcpLimits,
        *,
        listen: str,
        internal_host: str,
        worker_id: int = 0,
    ) -> None:
        self.router = router
        self.limits = limits
        self.worker_id = worker_id
        self.address = ""
        self.internal_address = ""
        self.now = time.monotonic()
        self._listen = listen
        self._internal_host = internal_host
        self._book = ConnectionLimits(limits)
        self._connections: dict[Address, _Connection] = {}
        self._server: asyncio.Server | None = None
        self._internal: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._accepted = 0
        self._closed_by = [0] * N_CLOSE_REASONS
        self._frames_in = 0
        self._frames_out = 0
        self._frames_dropped = 0
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._internal_host else socket.AF_INET
        internal = socket.socket(family, socket.SOCK_DGRAM)
        try:
            internal.bind((self._internal_host.strip("[]"), 0))
            internal.setblocking(False)
            self._internal, _ = await loop.create_datagram_endpoint(
                lambda: _Internal(self), sock=internal
            )
            self.internal_address = join_host_port(*internal.getsockname()[:2])
            listener = bind_tcp(self._listen)
            self.address = join_host_port(*listener.getsockname()[:2])
            self._server = await loop.create_server(
                lambda: _Connection(self), sock=listener, backlog=LISTEN_BACKLOG
            )
        except BaseException:
            await self.close()
            raise
        self._sweeper = loop.create_task(self._sweep())
        log_event(
            logger,
            "relay.tcp_listening",
            worker=self.worker_id,
            tcp=self.address,
            internal=self.internal_address,
        )

    # ---- connections -----------------------------------------------------------------

    def accept(self, conn: _Connection) -> None:
        self._accepted += 1
        refused = CloseReason.DRAINING if self.router.draining else self._book.admit(conn.peer[0])
        if refused is not None:
            conn.closed = True  # never pending: forget() and release() must not see it
            self._closed_by[refused] += 1
            if conn.transport is not None:
                conn.transport.abort()
            return
        self._connections[conn.peer] = conn
        conn.start_timer(self.limits.first_frame_timeout_s)

    def forget(self, conn: _Connection, reason: CloseReason) -> None:
        """A connection closed (by us or the client): counted, its binding removed."""
        self._closed_by[reason] += 1
        if self._connections.get(conn.peer) is conn:
            del self._connections[conn.peer]
            self.router.forget(conn.peer)
        self._book.release(conn.peer[0], conn.is_open)

    def client_frame(self, conn: _Connection, packet: bytes) -> None:
        peer = conn.peer
        if not conn.is_open:
            refused = self._book.can_open(peer[0])
            if refused is not None:
                conn.close(refused)
                return
        result = self.router.route_client_packet(packet, peer, self.now)
        if isinstance(result, Drop):
            if conn.is_open:
                self._frames_dropped += 1  # counted by the router too, by reason
            else:
                conn.close(close_reason_of(result.reason))
            return
        if not conn.is_open:
            self._book.promote(peer[0])
            conn.opened()
        self._frames_in += 1
        if self._internal is not None:
            self._internal.sendto(result.data, result.dest)

    def transceiver_frame(self, data: bytes, source: Address) -> None:
        result = self.router.route_transceiver_packet(data, source)
        if type(result) is not Forward:
            return
        conn = self._connections.get(result.dest)
        if conn is not None and conn.send(result.data):
            self._frames_out += 1
        else:
            self._frames_dropped += 1
            self.router.count_send_failed(T2C, len(result.data))

    async def _sweep(self) -> None:
        """The coarse clock, idle expiry, and closing connections whose binding is gone."""
        last_expire = self.now
        while True:  # until cancelled, one turn per SWEEP_S / 4
            await asyncio.sleep(SWEEP_S / 4)
            self.now = now = time.monotonic()
            if now - last_expire < SWEEP_S:
                continue
            last_expire = now
            self.router.expire_idle(now)
            stale = [
                c for c in self._connections.values() if c.is_open and not self.router.get(c.peer)
            ]
            for conn in stale:
                conn.close(CloseReason.IDLE)

    # ---- admin -----------------------------------------------------------------------

    def counters(self) -> TcpCounters:
        return TcpCounters(
            self._accepted,
            self._book.pending,
            self._book.open,
            tuple(self._closed_by),
            self._frames_in,
            self._frames_out,
            self._frames_dropped,
        )

    def connections(self) -> Iterable[Address]:
        return list(self._connections)

    def drain(self) -> None:
        self.router.draining = True

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            conn.close(CloseReason.SHUTDOWN)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        if self._internal is not None:
            self._internal.close()


def limits_of(settings: RelaySettings) -> TcpLimits:
    return TcpLimits(
        first_frame_timeout_s=settings.tcp_first_frame_timeout_s,
        max_frame_bytes=settings.tcp_max_frame_bytes,
        max_pending=settings.tcp_max_pending,
        max_pending_per_ip=settings.tcp_max_pending_per_ip,
        max_open=settings.tcp_max_open,
        max_open_per_ip=settings.tcp_max_open_per_ip,
    )


def make_tcp_plane(
    settings: RelaySettings, keyring: ufrag.Keyring, topology: TopologyView, worker_id: int
) -> TcpPlane | None:
    """The worker's TCP plane (not started), or None when `tcp_listen` is empty. Its router
    is its own: TCP clients are never written to the Redis copy (a connection dies with the
    relay process, and the client recovers by ICE), and TCP and UDP clients with the same
    address and port stay apart."""
    if not settings.tcp_listen:
        return None
    router = make_router(settings, keyring, topology, tcp=True)
    internal_host = settings.internal_listen.rpartition(":")[0]
    return TcpPlane(
        router,
        limits_of(settings),
        listen=settings.tcp_listen,
        internal_host=internal_host,
        worker_id=worker_id,
    )
