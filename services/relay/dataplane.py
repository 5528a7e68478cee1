"""Thin asyncio I/O around the router: the public UDP socket(s) and one internal socket.

Client datagrams arrive on the public sockets (SO_REUSEPORT, so sibling workers share the
address) and leave framed from the internal socket to the transceiver; transceiver frames
arrive on the internal socket and leave unframed from the public socket the client talks
to. A coarse clock ticks every `TICK_S` instead of reading the time per packet; the same
ticker expires idle bindings and refreshes the Redis TTLs in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from libs.config.settings import join_host_port, parse_host_port
from libs.fastio import fastio
from libs.observability.telemetry import log_event
from libs.wire.framing import Address
from services.relay import native
from services.relay.router import C2T, T2C, Binding, BindingInfo, Forward, Router, RouterCounters
from services.relay.store import TOPOLOGY_RESAVE_S, BindingStore, RedisCounts, counts_of
from services.relay.tcp import TcpCounters, TcpPlane
from services.relay.topology import TopologyView, encode_view
from voiceedge.relay.v1 import relay_pb2

logger = logging.getLogger("voiceedge.relay")

TICK_S = 0.25
MAX_ROUNDS = 8  # batched I/O: at most 8 x 64 datagrams per wake-up of one socket
NEGATIVE_CACHE_S = 1.0
NEGATIVE_CACHE_MAX = 100_000
_NO_BINDING = relay_pb2.DROP_REASON_NO_BINDING


def bind_udp(address: str, *, reuse_port: bool) -> socket.socket:
    """A non-blocking UDP socket bound to `host:port` (IPv6 literal in brackets)."""
    host, port = parse_host_port(address, "udp address")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        fastio.set_buffers(sock)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def sockname(sock: socket.socket) -> str:
    """The bound address as `host:port` text."""
    host, port = sock.getsockname()[:2]
    return join_host_port(host, port)


@dataclass(frozen=True, slots=True)
class WorkerCounters:
    """One worker's router, Redis and ICE-TCP counters, or the sum over workers (`+`,
    `total`)."""

    router: RouterCounters = field(default_factory=RouterCounters)
    redis: RedisCounts = field(default_factory=RedisCounts)
    tcp: TcpCounters = field(default_factory=TcpCounters)

    def __add__(self, other: WorkerCounters) -> WorkerCounters:
        return WorkerCounters(
            self.router + other.router, self.redis + other.redis, self.tcp + other.tcp
        )

    @classmethod
    def total(cls, items: Iterable[WorkerCounters]) -> WorkerCounters:
        return sum(items, cls())


class _Public(asyncio.DatagramProtocol):
    def __init__(self, plane: DataPlane, via: int, ipv6: bool) -> None:
        self._plane = plane
        self._via = via
        self._ipv6 = ipv6

    def datagram_received(self, data: bytes, addr: Any) -> None:
        plane = self._plane
        if self._ipv6:
            addr = (addr[0], addr[1])
        result = plane.router.route_client_packet(data, addr, plane.now, self._via)
        if type(result) is Forward:
            plane.internal_sendto(result.data, result.dest)
        elif result[0] == _NO_BINDING and plane.store.enabled:
            plane.lookup(addr, self._via)

    def error_received(self, exc: Exception) -> None:
        self._plane.router.count_send_failed(T2C, 0)


class _Internal(asyncio.DatagramProtocol):
    def __init__(self, plane: DataPlane, ipv6: bool) -> None:
        self._plane = plane
        self._ipv6 = ipv6

    def datagram_received(self, data: bytes, addr: Any) -> None:
        plane = self._plane
        if self._ipv6:
            addr = (addr[0], addr[1])
        result = plane.router.route_transceiver_packet(data, addr)
        if type(result) is Forward:
            plane.public_sendto[result.via](result.data, result.dest)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a transceiver that went away: counted, never fatal.
        self._plane.router.count_send_failed(C2T, 0)


class DataPlane:
    """One worker's sockets around one Router."""

    def __init__(
        self,
        router: Router,
        store: BindingStore,
        *,
        udp_listen: tuple[str, ...],
        internal_listen: str,
        binding_ttl_s: float,
        redis_max_inflight: int,
        worker_id: int = 0,
        batched_io: bool = True,
        tcp: TcpPlane | None = None,
        persist_topology: bool = False,
        native_path: str = "auto",
        udp_gso: bool = False,
    ) -> None:
        self.router = router
        self.tcp = tcp  # the worker's ICE-TCP listener, started and closed with the plane
        self.store = store
        self.worker_id = worker_id
        self.now = time.monotonic()
        self._udp_listen = udp_listen
        self._internal_listen = internal_listen
        self._refresh_every_s = max(1.0, binding_ttl_s / 3)
        self._max_inflight = redis_max_inflight
        self._transports: list[asyncio.DatagramTransport] = []
        self.public_sendto: list[Any] = []
        self.internal_sendto: Any = None
        self.public_addresses: list[str] = []
        self.internal_address = ""
        self._inflight: dict[Address, asyncio.Task[None]] = {}
        self._negative: dict[Address, float] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._fastio = fastio.load() if batched_io else None
        self._native_wanted = native.wanted(native_path)
        self._native: native.NativePath | None = None
        self._udp_gso = udp_gso
        self._gso_refused = 0
        self._readers: list[socket.socket] = []
        self._public_fds: list[int] = []
        self._internal_fd = -1
        self._persist_topology = persist_topology and store.enabled
        self._saved_topology: object = None  # the transceivers mapping last written
        self._saved_topology_at = float("-inf")  # monotonic
        self._saver: asyncio.Task[None] | None = None
        router.on_bind = self._on_bind

    @property
    def batched(self) -> bool:
        """True when the native recvmmsg/sendmmsg path carries the traffic."""
        return self._fastio is not None

    @property
    def native(self) -> bool:
        """True when the C per-packet path (services/relay/native) carries bound clients."""
        return self._native_wanted

    async def start(self) -> None:
        if self._native_wanted:
            self._start_native()
        elif self._fastio is not None:
            self._start_batched()
        else:
            await self._start_endpoints()
        if self.tcp is not None:
            try:
                await self.tcp.start()
            except BaseException:
                await self.close()
                raise
        self._ticker = asyncio.create_task(self._tick())
        log_event(
            logger,
            "relay.listening",
            worker=self.worker_id,
            udp=",".join(self.public_addresses),
            internal=self.internal_address,
            batched_io=self.batched,
            native_path=self.native,
        )

    def _bind_raw(self) -> None:
        """The internal and public sockets as plain non-blocking sockets (batched paths)."""
        try:
            internal = bind_udp(self._internal_listen, reuse_port=False)
            self._readers.append(internal)
            self._internal_fd = internal.fileno()
            self.internal_address = sockname(internal)
            for address in self._udp_listen:
                sock = bind_udp(address, reuse_port=True)
                self._readers.append(sock)
                self._public_fds.append(sock.fileno())
                self.public_addresses.append(sockname(sock))
        except BaseException:
            for sock in self._readers:
                sock.close()
            self._readers.clear()
            raise

    def _start_batched(self) -> None:
        loop = asyncio.get_running_loop()
        self._bind_raw()
        loop.add_reader(self._internal_fd, self._internal_readable)
        for via, fd in enumerate(self._public_fds):
            loop.add_reader(fd, self._public_readable, via, fd)

    def _start_native(self) -> None:
        loop = asyncio.get_running_loop()
        self._bind_raw()
        core = native.NativePath(
            self.router,
            self._internal_fd,
            tuple(self._public_fds),
            lambda: self.now,
            lookups=self.store.enabled,
            gso=self._udp_gso,
            lookups_per_s=float(self._max_inflight),
        )
        self._native = core
        self.router.attach(core)
        loop.add_reader(self._internal_fd, self._internal_native)
        for via, fd in enumerate(self._public_fds):
            loop.add_reader(fd, self._public_native, via)

    def _public_native(self, via: int) -> None:
        """C forwards the bound clients' media and counts its drops; what it hands up is
        routed here as on the Python path (STUN, new clients), or a Redis lookup."""
        assert self._native is not None
        router, core, internal = self.router, self._native, self._readers[0]
        for data, addr, kind in core.pump_public(via):
            if kind == native.LOOKUP:
                self.lookup(addr, via)
                continue
            result = router.route_client_packet(data, addr, self.now, via, kind == native.ADMITTED)
            if type(result) is Forward:
                binding = router.get(addr)
                if binding is not None:
                    core.set_via(binding)
                self._send(internal, result, C2T)
            elif result[0] == _NO_BINDING and self.store.enabled:
                self.lookup(addr, via)

    def _internal_native(self) -> None:
        assert self._native is not None
        route = self.router.route_transceiver_packet
        for frame, addr in self._native.pump_internal():
            result = route(frame, addr)
            if type(result) is Forward:
                self._send(self._readers[1 + result.via], result, T2C)

    def _send(self, sock: socket.socket, forward: Forward, direction: int) -> None:
        """One datagram the Python router decided on the native path (rare: STUN)."""
        try:
            sock.sendto(forward.data, forward.dest)
        except OSError:
            self.router.count_send_failed(direction, len(forward.data))

    def _public_readable(self, via: int, fd: int) -> None:
        """Up to MAX_ROUNDS batches per wake-up, then back to the loop (fairness)."""
        assert self._fastio is not None
        recv_batch, send_batch = self._fastio.recv_batch, self._fastio.send_batch
        route = self.router.route_client_packet
        internal_fd, now, lookups = self._internal_fd, self.now, self.store.enabled
        for _ in range(MAX_ROUNDS):
            items = recv_batch(fd, fastio.BATCH)
            out: list[Any] = []
            for data, addr in items:
                result = route(data, addr, now, via)
                if type(result) is Forward:
                    out.append(result)
                elif lookups and result[0] == _NO_BINDING:
                    self.lookup(addr, via)
            if out:
                sent = send_batch(internal_fd, out)
                for forward in out[sent:]:
                    self.router.count_send_failed(C2T, len(forward.data))
            if len(items) < fastio.BATCH:
                return

    def _internal_readable(self) -> None:
        assert self._fastio is not None
        recv_batch, send_batch = self._fastio.recv_batch, self._fastio.send_batch
        router = self.router
        route = router.route_transceiver_packet
        public_fds = self._public_fds
        for _ in range(MAX_ROUNDS):
            items = recv_batch(self._internal_fd, fastio.BATCH)
            by_via: list[list[Any]] = [[] for _ in public_fds]
            for data, addr in items:
                result = route(data, addr)
                if type(result) is Forward:
                    by_via[result.via].append(result)
            for via, out in enumerate(by_via):
                if not out:
                    continue
                sent = send_batch(public_fds[via], out)
                for forward in out[sent:]:
                    router.count_send_failed(T2C, len(forward.data))
            if len(items) < fastio.BATCH:
                return

    async def _start_endpoints(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            internal = bind_udp(self._internal_listen, reuse_port=False)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Internal(self, internal.family == socket.AF_INET6), sock=internal
            )
            self._transports.append(transport)
            self.internal_sendto = transport.sendto
            self.internal_address = sockname(internal)
            for via, address in enumerate(self._udp_listen):
                sock = bind_udp(address, reuse_port=True)
                self.public_addresses.append(sockname(sock))
                ipv6 = sock.family == socket.AF_INET6
                transport, _ = await loop.create_datagram_endpoint(
                    lambda via=via, ipv6=ipv6: _Public(self, via, ipv6),  # type: ignore[misc]
                    sock=sock,
                )
                self._transports.append(transport)
                self.public_sendto.append(transport.sendto)
        except BaseException:
            await self.close()
            raise

    async def _tick(self) -> None:
        last_refresh = last_expire = self.now
        while True:  # until cancelled, one turn per TICK_S
            await asyncio.sleep(TICK_S)
            self.now = now = time.monotonic()
            if now - last_expire >= 1.0:
                last_expire = now
                self.router.expire_idle(now)
                self.router.prune_topology(time.time())
                if len(self._negative) > NEGATIVE_CACHE_MAX:
                    self._negative.clear()
                self._save_topology()
                self._check_gso()
            if self.store.enabled and now - last_refresh >= self._refresh_every_s:
                last_refresh = now
                # In its own task: a slow or down Redis must not stall the coarse clock.
                if self._refresher is None or self._refresher.done():
                    self._refresher = asyncio.create_task(self._refresh(now))

    def _check_gso(self) -> None:
        """Logs once when the kernel refused UDP segmentation offload (the C core then
        sends plain datagrams)."""
        if self._native is None or not self._udp_gso:
            return
        refused = self._native.stats()["gso_refused"]
        if refused > self._gso_refused:
            self._gso_refused = refused
            log_event(logger, "relay.gso_refused", worker=self.worker_id, refused=refused)

    async def _refresh(self, now: float) -> None:
        """TTL refresh for bindings with traffic since their last write, batched."""
        due = [b for b in self.router.bindings() if b.last_seen > b.stored_at]
        entries = [(b.client, b.cluster_id, b.transceiver_id) for b in due]
        ok = await self.store.refresh(entries)
        for binding in due:
            binding.stored_at = now if ok else -1.0

    def _save_topology(self) -> None:
        """Writes the routed-on topology to the shared store when its nodes changed (worker
        0 only), in its own task so a slow Redis never stalls the clock."""
        view = self.router.topology
        if not self._persist_topology:
            return
        fresh = self.now - self._saved_topology_at < TOPOLOGY_RESAVE_S
        if view.transceivers == self._saved_topology and fresh:
            return
        if self._saver is not None and not self._saver.done():
            return
        self._saver = asyncio.create_task(self._write_topology(view))

    async def _write_topology(self, view: TopologyView) -> None:
        if await self.store.save_topology(encode_view(view)):
            self._saved_topology = view.transceivers
            self._saved_topology_at = self.now

    def _on_bind(self, binding: Binding) -> None:
        self._negative.pop(binding.client, None)
        if not self.store.enabled or self._closed:
            return
        binding.stored_at = self.now
        task = asyncio.get_running_loop().create_task(self._put(binding))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, binding: Binding) -> None:
        if not await self.store.put(binding.client, binding.cluster_id, binding.transceiver_id):
            binding.stored_at = -1.0  # retried by the next refresh

    def lookup(self, client: Address, via: int) -> None:
        """DTLS/SRTP from an unbound client: ask the shared store once. Packets that arrive
        meanwhile are dropped (counted NO_BINDING); DTLS retransmits and SRTP tolerates
        the loss. Misses are remembered for NEGATIVE_CACHE_S, lookups are bounded."""
        if client in self._inflight or self._closed:
            return
        expiry = self._negative.get(client)
        if expiry is not None and expiry > self.now:
            return
        if len(self._inflight) >= self._max_inflight:
            return
        task = asyncio.get_running_loop().create_task(self._lookup(client, via))
        self._inflight[client] = task

    async def _lookup(self, client: Address, via: int) -> None:
        try:
            ids = await self.store.get(client)
            if ids is None or not self.router.restore(client, ids[0], ids[1], self.now, via):
                self._negative[client] = self.now + NEGATIVE_CACHE_S
        finally:
            self._inflight.pop(client, None)

    def counters(self) -> WorkerCounters:
        tcp = self.tcp.counters() if self.tcp is not None else TcpCounters()
        return WorkerCounters(self.router.counters(), counts_of(self.store), tcp)

    def drain(self, grace_s: float) -> None:
        """New clients are refused from now on; the owner closes the plane after `grace_s`."""
        self.router.draining = True
        if self.tcp is not None:
            self.tcp.drain()

    async def list_bindings(self) -> list[BindingInfo]:
        return [binding.info() for binding in self.router.bindings()]

    async def flush_writes(self) -> None:
        """Waits for the Redis writes started so far (tests, shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def flush_lookups(self) -> None:
        """Waits for the Redis lookups started so far."""
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def refresh_now(self) -> None:
        """Runs the periodic Redis refresh at once."""
        await self._refresh(time.monotonic())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [
            t
            for t in (
                self._ticker,
                self._refresher,
                self._saver,
                *self._inflight.values(),
                *self._writes,
            )
            if t
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        loop = asyncio.get_running_loop()
        if self._native is not None:
            self.router.attach(None)  # pulls the last counters first
            self._native = None
        for sock in self._readers:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._readers.clear()
        if self.tcp is not None:
            await self.tcp.close()
