"""One internal UDP port for every session (wire contract: protos/wire/relay-framing-v1.md).

Relays send each client datagram wrapped in the framing header carrying the client's public
address. This socket unwraps it and hands the payload to the session's aioice protocol as if
it came from the client itself, so XOR-MAPPED-ADDRESS tells the client its real address.
Demux: by client address; an unknown address is admitted only by a STUN Binding request
whose USERNAME names a session's server ufrag and whose MESSAGE-INTEGRITY verifies with that
session's password (RFC 8445 §7.2.2, RFC 8489 §9.1.3). Replies go, framed, to the relay that
last sent for that client, so a restarted or different relay takes over at once.

A relay worker that starts without bindings (no Redis) greets the transceivers with a
recall hello (protos/wire/relay-recall-v1.md); the mux answers with the UDP clients it last
heard through that relay's host, each proven with its session's ICE password and the
hello's nonce, at most once per HELLO_INTERVAL_S per relay socket.

Control ahead of media (setting `mux_control_first`, off by default until a quiet-machine
A/B shows it costs media nothing; BENCHMARKS.md): the mux reads its socket itself
(recvmmsg, up to READ_BATCHES x fastio.BATCH datagrams per wake-up) and, of what one
wake-up read, hands STUN (ICE checks and consent), DTLS and frames of unknown clients on
first, then RTP/RTCP (RFC 7983 first byte 128-191). A loop that falls behind thus answers
a consent check after reading the media queued ahead of it, not after processing it (an
SRTP unprotect and a jitter-buffer insert each).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from libs.fastio import fastio
from libs.observability.telemetry import log_event
from libs.wire import framing, recall, stun
from libs.wire.classify import is_rtp
from libs.wire.framing import Address

logger = logging.getLogger("voiceedge.transceiver.udpmux")
_BINDING_REQUEST_TYPE = stun.BINDING_REQUEST.to_bytes(2, "big")


class DatagramSink(Protocol):
    """What the mux delivers to: aioice's StunProtocol has exactly this shape."""

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


# Drop reasons (counted in UdpMux.drops).
DROP_BAD_FRAME = "bad_frame"
DROP_NOT_STUN = "unknown_address_not_stun"
DROP_NOT_BINDING = "unknown_address_not_binding_request"
DROP_NO_USERNAME = "no_username"
DROP_UNKNOWN_UFRAG = "unknown_ufrag"
DROP_BAD_INTEGRITY = "bad_integrity"
DROP_NO_RELAY = "no_relay_for_client"
DROP_REPLAYED = "replayed_transaction"
DROP_BAD_RECALL = "bad_recall_hello"
DROP_RECALL_RATE = "recall_hello_rate_limited"
HELLO_INTERVAL_S = 0.2  # per relay socket: a spoofed hello flood costs one answer per 0.2 s
MAX_HELLO_SOURCES = 1024
# Binding-request transaction ids remembered per session: a check from a new address that
# repeats one of them is a replay of the client's own packet (RFC 8489 §6: ids are random
# per transaction; retransmissions come from the same address).
REMEMBERED_TRANSACTIONS = 64
# Batches of fastio.BATCH datagrams read per wake-up of the socket: bounds one loop turn
# (~0.5 ms of reading, then the media's processing) while a backlog's control packets
# overtake up to this many media datagrams.
READ_BATCHES = 8
RECEIVE_BYTES = 2048  # larger datagrams are not WebRTC media (fastio hands them over empty)


def is_media(payload: bytes) -> bool:
    """RTP or RTCP by the first byte (RFC 7983 §7: 128-191); STUN (0-3) and DTLS (20-63)
    are control, handed on first."""
    return bool(payload) and 127 < payload[0] < 192


def admit(payload: bytes, password_of: Callable[[str], str | None]) -> tuple[str | None, str]:
    """Decides whether a datagram from an unknown client address may open a binding.

    Returns (server ufrag, "") to admit, or (None, drop reason). Pure: `password_of` maps a
    server ufrag to its session's ICE password, or None if no session owns it."""
    try:
        message = stun.parse(payload)
    except stun.StunError:
        return None, DROP_NOT_STUN
    if message.message_type != stun.BINDING_REQUEST:
        return None, DROP_NOT_BINDING
    username = message.username
    ufrag = stun.server_ufrag(username) if username else None
    if ufrag is None:
        return None, DROP_NO_USERNAME
    password = password_of(ufrag)
    if password is None:
        return None, DROP_UNKNOWN_UFRAG
    # Short-term credentials: the key is the password itself (RFC 8489 §9.1.2).
    if not message.verify_integrity(password.encode("utf-8")):
        return None, DROP_BAD_INTEGRITY
    return ufrag, ""


@dataclass
class MuxCounters:
    """Per-session UDP payload counters (all of STUN, DTLS and SRTP)."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


EARLY_RTP_MAX = 50  # 1 s of caller packets before our RTP path started


@dataclass(eq=False)
class MuxSession:
    """One session's slot on the mux: its aioice protocol and the client addresses bound."""

    ufrag: str
    password: str
    local: Address
    sink: DatagramSink | None = None
    # Once set (DTLS keyed SRTP), RTP (not RTCP) goes here instead of through aioice/aiortc.
    rtp_sink: Callable[[bytes], None] | None = None
    # Not None: RTP that comes before rtp_sink is set is kept here (at most EARLY_RTP_MAX)
    # for it, not handed to aiortc: the caller's first packets can overtake the DTLS
    # handshake's end on its way through aiortc (the adaptive receive path's first words).
    early_rtp: list[bytes] | None = None
    addresses: set[Address] = field(default_factory=set)
    counters: MuxCounters = field(default_factory=MuxCounters)
    transactions: dict[bytes, None] = field(default_factory=dict)  # insertion-ordered

    def remember(self, transaction_id: bytes) -> None:
        self.transactions[transaction_id] = None
        if len(self.transactions) > REMEMBERED_TRANSACTIONS:
            del self.transactions[next(iter(self.transactions))]


class VirtualTransport(asyncio.DatagramTransport):
    """The per-connection datagram transport aioice sees; writes go through the mux."""

    def __init__(self, mux: UdpMux, session: MuxSession) -> None:
        super().__init__()
        self._mux = mux
        self._session = session
        self._closing = False

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing or addr is None:
            return
        self._mux.send(self._session, (str(addr[0]), int(addr[1])), bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._session.local
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._mux.unregister(self._session)
        sink = self._session.sink
        if sink is not None:
            asyncio.get_running_loop().call_soon(sink.connection_lost, None)

    def abort(self) -> None:
        self.close()


class _SocketSender:
    """Sends on the mux's non-blocking socket; what the kernel does not take at once
    (EAGAIN) is queued, bounded, and written when the socket is writable again. The mux
    reads the socket itself (UdpMux._readable), so no asyncio transport owns it."""

    MAX_QUEUED = 4096

    def __init__(self, sock: socket.socket, on_error: Callable[[], None]) -> None:
        self.sock = sock
        self._on_error = on_error
        self._queue: collections.deque[tuple[bytes, Address]] = collections.deque()
        self.dropped = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def sendto(self, data: bytes, addr: Address) -> None:
        if self._queue:
            self._enqueue(data, addr)
            return
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            self._enqueue(data, addr)
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._writable)
        except OSError:
            self._on_error()

    def _enqueue(self, data: bytes, addr: Address) -> None:
        if len(self._queue) >= self.MAX_QUEUED:
            self.dropped += 1
            self._on_error()
            return
        self._queue.append((data, addr))

    def _writable(self) -> None:
        while self._queue:
            data, addr = self._queue[0]
            try:
                self.sock.sendto(data, addr)
            except BlockingIOError:
                return
            except OSError:
                self._on_error()
            self._queue.popleft()
        asyncio.get_running_loop().remove_writer(self.sock.fileno())

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._queue:
            loop.remove_writer(self.sock.fileno())
            self._queue.clear()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()


class UdpMux(asyncio.DatagramProtocol):
    """The shared socket. `start()` binds it; `register()` gives each session a slot.

    `control_first` (setting `mux_control_first`, off by default): the mux reads the socket
    itself and hands control on ahead of media (module docstring). Off, an asyncio datagram
    transport reads it and every datagram is handled in arrival order."""

    def __init__(self, *, control_first: bool = False) -> None:
        self.control_first = control_first
        self._transport: _SocketSender | asyncio.DatagramTransport | None = None
        self._by_ufrag: dict[str, MuxSession] = {}
        self._by_address: dict[Address, MuxSession] = {}
        self._relay_of: dict[Address, Address] = {}
        # framing.header() per bound client: encoding parses the address (ipaddress), too
        # slow to repeat for every packet.
        self._header_of: dict[Address, bytes] = {}
        # The whole framing header of a bound IPv4 client -> (its session, its address): a
        # datagram starting with a known header needs no decode (the header was validated
        # when the client was bound, and an IPv6 header differs in its flags byte).
        self._route_of: dict[bytes, tuple[MuxSession, Address]] = {}
        self.drops: Counter[str] = Counter()
        # Clients a relay reaches over ICE-TCP (frame flag bit 7): their peer-reflexive
        # candidates are tcp (aiortc_compat.install_tcp_peers).
        self.tcp_clients: set[Address] = set()
        # sendmmsg for what the pacer sends in one tick (hold/flush), when the extension
        # is there; otherwise one sendto per datagram.
        self._fastio = fastio.load()
        self._fd = -1
        self._held: list[tuple[Address, bytes]] | None = None
        self.send_batches = 0
        self.frames_in = 0
        self.frames_out = 0
        self.address: Address = ("", 0)
        self._hello_at: dict[Address, float] = {}  # relay socket -> monotonic of last answer
        self.recall_answers = 0

    async def start(self, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        family, _, _, _, sockaddr = (await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM))[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # Every session's packets share this socket: the default ~200 KiB receive
            # buffer overflows within one busy loop turn at a few hundred sessions.
            fastio.set_buffers(sock)
            sock.bind(sockaddr)
            sock.setblocking(False)
            if self.control_first:
                loop.add_reader(sock.fileno(), self._readable)
                self._transport = _SocketSender(sock, self.error_received)
                self._fd = sock.fileno()
            else:
                await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        sockname = sock.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        # Below 2x fastio.SOCKET_BUFFER_BYTES, the kernel capped the buffers at
        # net.core.rmem_max / wmem_max (no CAP_NET_ADMIN): raise those for many sessions.
        receive, send = self.socket_buffers()
        log_event(
            logger,
            "udpmux.started",
            media__address=self.address[0],
            media__port=self.address[1],
            receive_buffer_bytes=receive,
            send_buffer_bytes=send,
        )
        return self.address

    def socket_buffers(self) -> tuple[int, int]:
        """(receive, send) buffer sizes of the shared socket as the kernel reports them
        (twice what was granted, socket(7)); (0, 0) before start()."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None:
            return 0, 0
        return (
            int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)),
            int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)),
        )

    async def close(self) -> None:
        for session in list(self._by_ufrag.values()):
            self.unregister(session)
        self._held = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # the socket

    def _receive(self) -> list[tuple[bytes, Address]]:
        """What the socket holds, up to READ_BATCHES batches (recvmmsg, or recvfrom)."""
        if not isinstance(self._transport, _SocketSender):
            return []
        items: list[tuple[bytes, Address]] = []
        sock = self._transport.sock
        for _ in range(READ_BATCHES):
            try:
                if self._fastio is not None:
                    batch = self._fastio.recv_batch(self._fd, fastio.BATCH)
                else:
                    batch = []
                    with contextlib.suppress(BlockingIOError):
                        for _ in range(fastio.BATCH):
                            data, addr = sock.recvfrom(RECEIVE_BYTES)
                            batch.append((data, (addr[0], addr[1])))
            except OSError:
                self.error_received()  # an ICMP error queued on the socket
                continue
            items += batch
            if len(batch) < fastio.BATCH:
                break
        return items

    def _readable(self) -> None:
        """One wake-up: control packets in arrival order, then media in arrival order."""
        media: list[tuple[MuxSession, Address, bytes, Address]] = []
        for data, relay in self._receive():
            route = self._route_of.get(data[: framing.HEADER_V4])
            if route is not None:
                session, client = route
                payload = data[framing.HEADER_V4 :]
            else:
                found = self._bind(data, relay)
                if found is None:
                    continue
                session, client, payload = found
            if is_media(payload):
                media.append((session, client, payload, relay))
            else:
                self._deliver(session, client, payload, relay)
        for session, client, payload, relay in media:
            self._deliver(session, client, payload, relay)

    # asyncio.DatagramProtocol (control_first off)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """One datagram from a relay, in arrival order."""
        relay: Address = addr if len(addr) == 2 else (addr[0], addr[1])
        route = self._route_of.get(data[: framing.HEADER_V4])
        if route is not None:
            self._deliver(route[0], route[1], data[framing.HEADER_V4 :], relay)
            return
        found = self._bind(data, relay)
        if found is not None:
            self._deliver(*found, relay)

    def _deliver(
        self, session: MuxSession, client: Address, payload: bytes, relay: Address
    ) -> None:
        self.frames_in += 1
        self._relay_of[client] = relay
        counters = session.counters
        counters.packets_in += 1
        counters.bytes_in += len(payload)
        rtp_sink = session.rtp_sink
        if rtp_sink is not None and is_rtp(payload):
            rtp_sink(payload)
        elif session.early_rtp is not None and is_rtp(payload):
            if len(session.early_rtp) < EARLY_RTP_MAX:
                session.early_rtp.append(payload)
        elif session.sink is not None:
            if payload[:2] == _BINDING_REQUEST_TYPE:
                session.remember(payload[8:20])
            session.sink.datagram_received(payload, client)

    def _bind(self, data: bytes, relay: Address) -> tuple[MuxSession, Address, bytes] | None:
        """A datagram whose header is not a bound client's: decoded in full, and admitted
        (which binds the client to a session) or dropped and counted."""
        try:
            client_ip, client_port, payload = framing.decode(data)
        except framing.FrameError:
            if recall.is_recall(data):
                self._answer_hello(data, relay)
            else:
                self.drops[DROP_BAD_FRAME] += 1
            return None
        client: Address = (client_ip, client_port)
        session = self._by_address.get(client)
        if session is None:
            ufrag, reason = admit(payload, self._password_of)
            if ufrag is None:
                self.drops[reason] += 1
                return None
            session = self._by_ufrag[ufrag]
            if payload[8:20] in session.transactions:
                # A bound client's own check, sent again from elsewhere: a replay, which
                # must not bind the sender (it would get our answers and triggered checks).
                self.drops[DROP_REPLAYED] += 1
                return None
            session.addresses.add(client)
            self._by_address[client] = session
            # Replies carry the header the client's frames came with: the same flags, so an
            # ICE-TCP client's (bit 7) go back on its relay's TCP connection.
            header = self._header_of[client] = data[: len(data) - len(payload)]
            if framing.is_tcp(header):
                self.tcp_clients.add(client)
            if len(header) == framing.HEADER_V4:
                self._route_of[header] = (session, client)
            log_event(
                logger,
                "udpmux.client_bound",
                level=logging.DEBUG,
                ice__ufrag=ufrag,
                client__address=client_ip,
                client__port=client_port,
            )
        return session, client, payload

    def _answer_hello(self, data: bytes, relay: Address) -> None:
        """A restarted relay worker asks for its host's clients: announce them."""
        try:
            nonce = recall.decode_hello(data)
        except recall.RecallError:
            self.drops[DROP_BAD_RECALL] += 1
            return
        now = time.monotonic()
        if now - self._hello_at.get(relay, float("-inf")) < HELLO_INTERVAL_S:
            self.drops[DROP_RECALL_RATE] += 1
            return
        if len(self._hello_at) >= MAX_HELLO_SOURCES:
            self._hello_at.clear()
        self._hello_at[relay] = now
        entries = []
        for client, via in self._relay_of.items():
            session = self._by_address.get(client)
            header = self._header_of.get(client)
            if via[0] != relay[0] or session is None or header is None:
                continue
            if client in self.tcp_clients:
                continue  # its TCP connection died with the relay process
            tag = recall.proof(session.password, nonce, header, session.ufrag)
            entries.append(recall.Entry(header, session.ufrag, tag))
        if self._transport is None:
            return
        for datagram in recall.encode_announce(nonce, entries):
            self._transport.sendto(datagram, relay)
        self.recall_answers += 1
        log_event(
            logger,
            "udpmux.bindings_announced",
            relay__address=relay[0],
            relay__port=relay[1],
            clients=len(entries),
        )

    def error_received(self, exc: Exception | None = None) -> None:
        self.drops["socket_error"] += 1

    # sessions

    def _password_of(self, ufrag: str) -> str | None:
        session = self._by_ufrag.get(ufrag)
        return None if session is None else session.password

    def register(self, ufrag: str, password: str, local: Address) -> MuxSession:
        if ufrag in self._by_ufrag:
            raise ValueError(f"ufrag {ufrag!r} already has a session on this transceiver")
        session = MuxSession(ufrag, password, local)
        self._by_ufrag[ufrag] = session
        return session

    def rekey(self, session: MuxSession, ufrag: str, password: str) -> None:
        """ICE restart (RFC 8445 §9): from now on the session admits new client addresses
        by its new server ufrag and password only; addresses already bound stay bound (a
        restart from the same address keeps its path)."""
        owner = self._by_ufrag.get(ufrag)
        if owner is not None and owner is not session:
            raise ValueError(f"ufrag {ufrag!r} already has a session on this transceiver")
        if self._by_ufrag.get(session.ufrag) is session:
            del self._by_ufrag[session.ufrag]
        session.ufrag, session.password = ufrag, password
        self._by_ufrag[ufrag] = session

    def transport_for(self, session: MuxSession, sink: DatagramSink) -> VirtualTransport:
        session.sink = sink
        return VirtualTransport(self, session)

    def unregister(self, session: MuxSession) -> None:
        if self._by_ufrag.get(session.ufrag) is session:
            del self._by_ufrag[session.ufrag]
        for client in session.addresses:
            if self._by_address.get(client) is session:
                del self._by_address[client]
                self._relay_of.pop(client, None)
                self.tcp_clients.discard(client)
                header = self._header_of.pop(client, None)
                if header is not None:
                    self._route_of.pop(header, None)
        session.addresses.clear()
        session.rtp_sink = None
        session.early_rtp = None

    def send(self, session: MuxSession, client: Address, payload: bytes) -> None:
        relay = self._relay_of.get(client)
        if relay is None or self._transport is None:
            self.drops[DROP_NO_RELAY] += 1
            return
        session.counters.packets_out += 1
        session.counters.bytes_out += len(payload)
        self.frames_out += 1
        header = self._header_of.get(client)
        if header is None:
            header = self._header_of[client] = framing.header(client[0], client[1])
        if self._held is not None:
            self._held.append((relay, header + payload))
        else:
            self._transport.sendto(header + payload, relay)

    def hold(self) -> None:
        """Collects sends until flush() (one pacer tick: every session's next packet)."""
        if self._fastio is not None and self._transport is not None and self._fd >= 0:
            self._held = []

    def flush(self) -> None:
        """Sends what hold() collected with sendmmsg; what the socket did not take (buffer
        full) goes through the transport, which queues it."""
        held, self._held = self._held, None
        if not held or self._fastio is None or self._transport is None:
            return
        sent = self._fastio.send_batch(self._fd, held)
        self.send_batches += 1
        for relay, data in held[sent:]:
            self._transport.sendto(data, relay)

    @property
    def session_count(self) -> int:
        return len(self._by_ufrag)

    @property
    def bound_addresses(self) -> int:
        return len(self._by_address)
