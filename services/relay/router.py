"""The relay's pure core: the binding table and the per-packet routing decision.

No sockets and no clock of its own: the I/O layer passes datagrams, addresses and `now`
(monotonic seconds) and sends what `Forward` says. Rules (no open door either way):

- Client -> transceiver. Only a STUN Binding request (RFC 8489 §6.1) can create a binding,
  and only when its USERNAME's server ufrag decodes with a MAC that verifies in constant
  time, its MESSAGE-INTEGRITY verifies with the ufrag-derived password (RFC 8445 §7.2.2,
  short-term credentials), and the topology knows the cluster and the transceiver. DTLS and
  SRTP (RFC 7983 §7 first-byte ranges) pass only for bound clients. The relay never
  answers: every outcome is a forward to a transceiver or a counted drop.
- Transceiver -> client. Frames are accepted only from a known transceiver media address,
  only for clients with a binding, and only from the transceiver that owns that binding.
- A token for another cluster is framed and sent straight to that cluster's transceiver
  media address from the topology; its replies come back to this relay (the transceiver
  answers the relay that last sent), so the client keeps talking to one address.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from libs.wire import framing, stun, ufrag
from libs.wire.classify import PacketClass, classify
from libs.wire.framing import Address
from services.relay.limits import Bucket, Budget, KeyedBuckets, ReplayCache, ReplayTable
from services.relay.settings import RelaySettings
from services.relay.topology import TopologyView, retained
from voiceedge.relay.v1 import relay_pb2

C2T = 0  # client -> transceiver
T2C = 1  # transceiver -> client
DIRECTIONS = (C2T, T2C)
DIRECTION_PROTO = {
    C2T: relay_pb2.DIRECTION_CLIENT_TO_TRANSCEIVER,
    T2C: relay_pb2.DIRECTION_TRANSCEIVER_TO_CLIENT,
}
CLASS_PROTO = {
    PacketClass.STUN: relay_pb2.PACKET_CLASS_STUN,
    PacketClass.DTLS: relay_pb2.PACKET_CLASS_DTLS,
    PacketClass.SRTP: relay_pb2.PACKET_CLASS_SRTP,
    PacketClass.OTHER: relay_pb2.PACKET_CLASS_OTHER,
}
N_CLASSES = len(PacketClass)
N_REASONS = max(relay_pb2.DropReason.values()) + 1

_STUN, _DTLS, _SRTP, _OTHER = (
    int(PacketClass.STUN),
    int(PacketClass.DTLS),
    int(PacketClass.SRTP),
    int(PacketClass.OTHER),
)
_CLASS_OF_FIRST_BYTE = bytes(int(classify(bytes([b]))) for b in range(256))
_UFRAG_REASONS = {
    "BAD_UFRAG": relay_pb2.DROP_REASON_BAD_UFRAG,
    "BAD_MAC": relay_pb2.DROP_REASON_BAD_MAC,
    "UNKNOWN_KEY_ID": relay_pb2.DROP_REASON_UNKNOWN_KEY_ID,
}
_IPV6_FLAG_BYTE = 3  # offset of the flags byte in a frame (relay-framing-v1)
_RATE_LIMITED = relay_pb2.DROP_REASON_RATE_LIMITED
_UNBOUND_PER_IP = Budget(200.0, 400.0)
_VERIFICATIONS = Budget(5000.0, 5000.0)
_NEW_ADDRESSES = Budget(0.5, 8.0)


@dataclass(frozen=True, slots=True)
class Admission:
    """What an address without a binding may cost (flood shedding, anti-reflection). The
    checks run cheapest first: the per-IP budget before any parsing, the replay cache and
    the worker's verification budget before any HMAC, the per-ufrag address budget after
    the request proved it holds the ufrag's password."""

    # Per source IP, from addresses without a binding: STUN, and DTLS/SRTP (Redis lookups).
    unbound_per_ip: Budget = _UNBOUND_PER_IP
    verifications: Budget = _VERIFICATIONS  # ufrag + MESSAGE-INTEGRITY checks/s
    new_addresses_per_ufrag: Budget = _NEW_ADDRESSES  # new client addresses per ufrag
    replay_cache_size: int = 65_536  # STUN transaction ids remembered
    max_tracked_keys: int = 100_000  # per-IP and per-ufrag buckets held


def source_key(ip: str) -> str | bytes:
    """What a per-source budget is keyed on: the IPv4 address, or the IPv6 /64 (one host
    holds a whole /64, so per-address budgets would not bound it; RFC 7421)."""
    if ":" not in ip:
        return ip
    try:
        return socket.inet_pton(socket.AF_INET6, ip)[:8]
    except OSError:
        return ip


class Forward(NamedTuple):
    """Send `data` to `dest`: a frame to a transceiver, or a payload to a client. `via` is
    the public socket of the client's binding, the one a payload to the client leaves from,
    so the I/O never looks the binding up again. The batched I/O sends Forwards as they are
    (libs/fastio reads the first two items)."""

    dest: Address
    data: bytes
    via: int = 0


class Drop(NamedTuple):
    """Do not send; the router has already counted it under `reason`."""

    reason: int  # relay_pb2.DropReason


_DROPS = {reason: Drop(reason) for reason in range(N_REASONS)}
# Forward(...) runs NamedTuple's generated Python __new__, a frame per packet; the hot
# paths build the tuple directly (same object, about half the cost).
_new_tuple = tuple.__new__


class Binding:
    """One cached route. Small on purpose: there may be a million of them."""

    __slots__ = (
        "bytes",
        "client",
        "cluster_id",
        "created_at",
        "header",
        "last_seen",
        "media",
        "packets",
        "stored_at",
        "transceiver_id",
        "ufrag",
        "via",
    )

    def __init__(
        self,
        client: Address,
        cluster_id: int,
        transceiver_id: int,
        media: Address,
        ufrag_text: str,
        now: float,
        via: int = 0,
        tcp: bool = False,
    ) -> None:
        self.client = client
        self.cluster_id = cluster_id
        self.transceiver_id = transceiver_id
        self.media = media
        self.header = framing.header(client[0], client[1], tcp=tcp)
        self.ufrag = ufrag_text
        self.created_at = time.time()
        self.last_seen = now
        self.packets = 0
        self.bytes = 0
        self.stored_at = -1.0  # when the Redis copy was last written (monotonic), -1: never
        self.via = via  # index of the public socket the client talks to

    def info(self) -> BindingInfo:
        return BindingInfo(
            self.client,
            self.cluster_id,
            self.transceiver_id,
            self.media,
            self.ufrag,
            self.last_seen,
            self.packets,
            self.bytes,
            self.created_at,
        )


@dataclass(frozen=True, slots=True)
class BindingInfo:
    """A copy of one binding as ListBindings shows it (a child worker sends these over the
    pipe; the parent lists its own the same way)."""

    client: Address
    cluster_id: int
    transceiver_id: int
    media: Address
    ufrag: str
    last_seen: float  # CLOCK_MONOTONIC, shared by all processes of the machine
    packets: int
    bytes: int
    created_at: float  # wall clock


class BindingMirror(Protocol):
    """A copy of the binding table outside Python (the native path, services/relay/native.py).
    The router calls `add` and `remove` from its one install/remove path, so every way a
    binding is made, moved or dropped reaches the copy; `pull` moves the copy's per-packet
    activity and counters into the router before anything reads them."""

    def add(self, binding: Binding) -> None: ...

    def remove(self, binding: Binding) -> None: ...

    def pull(self, router: Router) -> None: ...


Matrix = tuple[tuple[int, ...], ...]  # [direction][packet class or drop reason]


def _zeros(columns: int) -> Matrix:
    return tuple((0,) * columns for _ in DIRECTIONS)


_NO_TRAFFIC = _zeros(N_CLASSES)
_NO_DROPS = _zeros(N_REASONS)


def _add(a: Matrix, b: Matrix) -> Matrix:
    return tuple(
        tuple(x + y for x, y in zip(ra, rb, strict=True)) for ra, rb in zip(a, b, strict=True)
    )


def _frozen(rows: list[list[int]]) -> Matrix:
    return tuple(tuple(row) for row in rows)


@dataclass(frozen=True, slots=True)
class RouterCounters:
    """One router's counters at one moment, or the sum of several workers' (`+`).
    Rows of the matrices are directions; columns packet classes (rx, fwd) or drop reasons."""

    rx_packets: Matrix = _NO_TRAFFIC
    rx_bytes: Matrix = _NO_TRAFFIC
    fwd_packets: Matrix = _NO_TRAFFIC
    fwd_bytes: Matrix = _NO_TRAFFIC
    drop_packets: Matrix = _NO_DROPS
    drop_bytes: Matrix = _NO_DROPS
    bindings_active: int = 0
    bindings_created: int = 0
    bindings_expired: int = 0
    bindings_evicted: int = 0

    def __add__(self, other: RouterCounters) -> RouterCounters:
        return RouterCounters(
            _add(self.rx_packets, other.rx_packets),
            _add(self.rx_bytes, other.rx_bytes),
            _add(self.fwd_packets, other.fwd_packets),
            _add(self.fwd_bytes, other.fwd_bytes),
            _add(self.drop_packets, other.drop_packets),
            _add(self.drop_bytes, other.drop_bytes),
            self.bindings_active + other.bindings_active,
            self.bindings_created + other.bindings_created,
            self.bindings_expired + other.bindings_expired,
            self.bindings_evicted + other.bindings_evicted,
        )

    @property
    def packets_received(self) -> int:
        return sum(sum(row) for row in self.rx_packets)

    @property
    def packets_forwarded(self) -> int:
        return sum(sum(row) for row in self.fwd_packets)

    @property
    def packets_dropped(self) -> int:
        return sum(sum(row) for row in self.drop_packets)


class Router:
    """Binding table and counters. All methods are synchronous and never raise on input."""

    def __init__(
        self,
        keyring: ufrag.Keyring,
        topology: TopologyView,
        *,
        idle_timeout_s: float = 30.0,
        drain_idle_s: float = 8.0,
        max_bindings: int = 1_000_000,
        verify_message_integrity: bool = True,
        on_bind: Callable[[Binding], None] | None = None,
        tcp: bool = False,
        admission: Admission | None = None,
        topology_hold_s: float = 300.0,
        gone_grace_s: float = 10.0,
        now: float = 0.0,
        replays: ReplayTable | None = None,
    ) -> None:
        self.keyring = keyring
        self.tcp = tcp  # the clients are ICE-TCP connections (services/relay/tcp.py)
        self.topology = topology
        self._fresh = topology  # the source's latest answer; `topology` adds retained nodes
        self.topology_hold_s = topology_hold_s
        self.gone_grace_s = gone_grace_s
        self._node_bindings: dict[tuple[int, int], int] = {}  # (cluster, transceiver) -> n
        self.admission = admission = admission or Admission()
        # Separate budgets: a restarted relay's unbound SRTP from a carrier NAT's IP must not
        # starve the STUN checks that rebind its calls.
        self._unbound_stun = KeyedBuckets[str | bytes](
            admission.unbound_per_ip, admission.max_tracked_keys
        )
        self._unbound_media = KeyedBuckets[str | bytes](
            admission.unbound_per_ip, admission.max_tracked_keys
        )
        self._verify_budget = Bucket(admission.verifications, now)
        self._ufrag_addresses = KeyedBuckets[str](
            admission.new_addresses_per_ufrag, admission.max_tracked_keys
        )
        self._replays = replays or ReplayCache(admission.replay_cache_size)
        self.idle_timeout_s = idle_timeout_s
        self.drain_idle_s = drain_idle_s
        self.max_bindings = max_bindings
        self.verify_message_integrity = verify_message_integrity
        self.on_bind = on_bind
        self.draining = False
        self._bindings: dict[Address, Binding] = {}  # insertion order = age (oldest first)
        self._by_header: dict[bytes, Binding] = {}
        # Plain ints on the hot path; exported by callbacks. Index: [direction][class].
        self.rx_packets = [[0] * N_CLASSES for _ in DIRECTIONS]
        self.rx_bytes = [[0] * N_CLASSES for _ in DIRECTIONS]
        self.fwd_packets = [[0] * N_CLASSES for _ in DIRECTIONS]
        self.fwd_bytes = [[0] * N_CLASSES for _ in DIRECTIONS]
        self.drop_packets = [[0] * N_REASONS for _ in DIRECTIONS]
        self.drop_bytes = [[0] * N_REASONS for _ in DIRECTIONS]
        self.bindings_created = 0
        self.bindings_expired = 0
        self.bindings_evicted = 0
        self.mirror: BindingMirror | None = None

    def attach(self, mirror: BindingMirror | None) -> None:
        """Keeps `mirror` in step with the table from now on (None: detaches, after pulling
        what the old one counted); the bindings already held are added at once."""
        self.pull()
        self.mirror = mirror
        if mirror is not None:
            for binding in self._bindings.values():
                mirror.add(binding)

    def pull(self) -> None:
        """Moves the mirror's activity and counters into the table and the plain ints."""
        if self.mirror is not None:
            self.mirror.pull(self)

    def counters(self) -> RouterCounters:
        """A copy of the hot path's plain ints (for the admin API, metrics, the pipe)."""
        self.pull()
        return RouterCounters(
            _frozen(self.rx_packets),
            _frozen(self.rx_bytes),
            _frozen(self.fwd_packets),
            _frozen(self.fwd_bytes),
            _frozen(self.drop_packets),
            _frozen(self.drop_bytes),
            len(self._bindings),
            self.bindings_created,
            self.bindings_expired,
            self.bindings_evicted,
        )

    @property
    def packets_received(self) -> int:
        return self.counters().packets_received

    @property
    def packets_forwarded(self) -> int:
        return self.counters().packets_forwarded

    @property
    def packets_dropped(self) -> int:
        return self.counters().packets_dropped

    # ---- table ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._bindings)

    def get(self, client: Address) -> Binding | None:
        return self._bindings.get(client)

    def bindings(self) -> Iterator[Binding]:
        self.pull()
        return iter(list(self._bindings.values()))

    def set_topology(self, topology: TopologyView, wall: float | None = None) -> None:
        """A source's new answer. Bindings whose transceiver moved follow it. Nodes the
        answer leaves out are kept while they have bindings or for topology_hold_s
        (`topology.retained`): an empty answer from a restarted geosteer, or a drained
        transceiver that deregistered while its callers still hear the end, never cuts a
        call."""
        self._fresh = topology
        self._retain(time.time() if wall is None else wall)
        self._follow_topology()

    def prune_topology(self, wall: float) -> bool:
        """Lets retained nodes go once their hold passed and their bindings left (the data
        plane calls it once a second); True if the view changed."""
        if not self.topology.retained:
            return False
        before = self.topology.transceivers
        self._retain(wall)
        if self.topology.transceivers == before:
            return False
        self._follow_topology()
        return True

    def _retain(self, wall: float) -> None:
        """The view to route on: the latest answer plus what `topology.retained` keeps."""
        self.topology = retained(
            self.topology,
            self._fresh,
            wall,
            self.topology_hold_s,
            self._node_bindings,
            self.gone_grace_s,
        )

    def _follow_topology(self) -> None:
        """One pass over the bindings after the view changed: those of a node that moved
        follow it; those of a node the view no longer routes to (a gone transceiver's
        callers) are dropped, so their packets are dropped as for any unknown node and their
        Redis copies, no longer refreshed, expire with their TTL (counted as expired)."""
        known = self.topology.transceivers
        stale: list[Address] = []
        for client, binding in self._bindings.items():
            media = known.get((binding.cluster_id, binding.transceiver_id))
            if media is None:
                stale.append(client)
            elif media != binding.media:
                binding.media = media
                if self.mirror is not None:
                    self.mirror.add(binding)
        for client in stale:
            self._remove(client)
        self.bindings_expired += len(stale)

    def _install(
        self,
        client: Address,
        cluster_id: int,
        transceiver_id: int,
        ufrag_text: str,
        now: float,
        via: int,
    ) -> Binding | Drop:
        if cluster_id not in self.topology.clusters:
            return _DROPS[relay_pb2.DROP_REASON_UNKNOWN_CLUSTER]
        media = self.topology.transceivers.get((cluster_id, transceiver_id))
        if media is None:
            return _DROPS[relay_pb2.DROP_REASON_UNKNOWN_TRANSCEIVER]
        self._remove(client)
        while len(self._bindings) >= self.max_bindings:
            # Full: the oldest binding (by creation) goes, so new calls are never refused.
            self._remove(next(iter(self._bindings)))
            self.bindings_evicted += 1
        binding = Binding(client, cluster_id, transceiver_id, media, ufrag_text, now, via, self.tcp)
        self._bindings[client] = binding
        self._by_header[binding.header] = binding
        if self.mirror is not None:
            self.mirror.add(binding)
        node = (cluster_id, transceiver_id)
        self._node_bindings[node] = self._node_bindings.get(node, 0) + 1
        self.bindings_created += 1
        if self.on_bind is not None:
            self.on_bind(binding)
        return binding

    def _remove(self, client: Address) -> None:
        binding = self._bindings.pop(client, None)
        if binding is not None:
            self._by_header.pop(binding.header, None)
            if self.mirror is not None:
                self.mirror.remove(binding)
            node = (binding.cluster_id, binding.transceiver_id)
            left = self._node_bindings[node] - 1
            if left:
                self._node_bindings[node] = left
            else:
                del self._node_bindings[node]

    def forget(self, client: Address) -> None:
        """Drops a client's binding at once (its ICE-TCP connection closed)."""
        self._remove(client)

    def restore(
        self, client: Address, cluster_id: int, transceiver_id: int, now: float, via: int = 0
    ) -> bool:
        """A binding found in the shared store (Redis) for a client with none in memory."""
        if client in self._bindings:
            return True
        result = self._install(client, cluster_id, transceiver_id, "", now, via)
        return isinstance(result, Binding)

    def preload(self, entries: Iterable[tuple[Address, int, int]], now: float) -> int:
        """The shared store's bindings, installed before the first packet (a relay that
        starts or restarts carries its calls on at once). No write back: the copy is where
        they came from. Returns how many were installed."""
        on_bind, self.on_bind = self.on_bind, None
        installed = 0
        try:
            for client, cluster_id, transceiver_id in entries:
                if len(self._bindings) >= self.max_bindings:
                    break
                if client in self._bindings:
                    continue
                result = self._install(client, cluster_id, transceiver_id, "", now, 0)
                if isinstance(result, Binding):
                    result.stored_at = now
                    installed += 1
        finally:
            self.on_bind = on_bind
        return installed

    def expire_idle(self, now: float) -> int:
        """Forgets bindings idle for idle_timeout_s (drain_idle_s while draining: a finished
        call's binding must not hold a drain for the whole idle timeout); returns how many."""
        timeout = (
            min(self.idle_timeout_s, self.drain_idle_s) if self.draining else self.idle_timeout_s
        )
        limit = now - timeout
        self.pull()
        stale = [c for c, b in self._bindings.items() if b.last_seen < limit]
        for client in stale:
            self._remove(client)
        self.bindings_expired += len(stale)
        return len(stale)

    # ---- packets -------------------------------------------------------------------------

    def _drop(self, direction: int, reason: int, size: int) -> Drop:
        self.drop_packets[direction][reason] += 1
        self.drop_bytes[direction][reason] += size
        return _DROPS[reason]

    def route_client_packet(
        self, data: bytes, client: Address, now: float, via: int = 0, admitted: bool = False
    ) -> Forward | Drop:
        """A datagram from a client's public address, received on public socket `via`;
        `admitted`: the native path already charged the per-IP budget for it."""
        size = len(data)
        kind = _CLASS_OF_FIRST_BYTE[data[0]] if size else _OTHER
        self.rx_packets[C2T][kind] += 1
        self.rx_bytes[C2T][kind] += size
        binding = self._bindings.get(client)
        if kind in (_SRTP, _DTLS):
            if binding is None:
                # Over the per-IP budget: no Redis lookup either (a flood from one host).
                if not self._unbound_media.take(source_key(client[0]), now):
                    return self._drop(C2T, _RATE_LIMITED, size)
                return self._drop(C2T, relay_pb2.DROP_REASON_NO_BINDING, size)
        elif kind == _STUN:
            if (
                binding is None
                and not admitted
                and not self._unbound_stun.take(source_key(client[0]), now)
            ):
                return self._drop(C2T, _RATE_LIMITED, size)  # before any parsing or HMAC
            result = self._route_stun(data, client, binding, now, via)
            if isinstance(result, Drop):
                self.drop_packets[C2T][result.reason] += 1
                self.drop_bytes[C2T][result.reason] += size
                return result
            binding = result
        else:
            return self._drop(C2T, relay_pb2.DROP_REASON_UNKNOWN_CLASS, size)
        binding.last_seen = now
        binding.via = via
        binding.packets += 1
        binding.bytes += size
        self.fwd_packets[C2T][kind] += 1
        self.fwd_bytes[C2T][kind] += size
        return _new_tuple(Forward, (binding.media, binding.header + data, binding.via))

    def _route_stun(
        self, data: bytes, client: Address, binding: Binding | None, now: float, via: int
    ) -> Binding | Drop:
        try:
            message = stun.parse(data)
        except stun.StunError:
            return _DROPS[relay_pb2.DROP_REASON_MALFORMED]
        is_request = message.message_type == stun.BINDING_REQUEST
        replays = self._replays
        if binding is not None:
            # Responses and indications have no USERNAME and ride the binding; a Binding
            # request with a new server ufrag is an ICE restart (RFC 8445 §9) and rebinds.
            if not is_request:
                return binding
            username = message.username
            server = stun.server_ufrag(username) if username is not None else None
            if server == binding.ufrag:
                # Remembered: this very request replayed from another address must not
                # bind there (a captured consent check turned into a reflector).
                replays.record(message.transaction_id, client)
                return binding
        elif not is_request:
            return _DROPS[relay_pb2.DROP_REASON_NOT_BINDING_REQUEST]
        elif self.draining:
            return _DROPS[relay_pb2.DROP_REASON_DRAINING]
        if replays.replayed(message.transaction_id, client):
            return _DROPS[relay_pb2.DROP_REASON_REPLAYED]
        if not self._verify_budget.take(now):
            return _DROPS[relay_pb2.DROP_REASON_OVERLOADED]
        verified = self._verify(message)
        if isinstance(verified, Drop):
            return verified
        token, server_ufrag = verified
        # Only now, with the password proven: a forged request cannot spend a victim's budget.
        if not self._ufrag_addresses.take(server_ufrag, now):
            return _DROPS[relay_pb2.DROP_REASON_ADDRESS_LIMIT]
        replays.record(message.transaction_id, client)
        if binding is not None and (binding.cluster_id, binding.transceiver_id) == (
            token.cluster_id,
            token.transceiver_id,
        ):
            binding.ufrag = server_ufrag  # restart onto the same transceiver: same route
            return binding
        return self._install(client, token.cluster_id, token.transceiver_id, server_ufrag, now, via)

    def _verify(self, message: stun.StunMessage) -> tuple[ufrag.RoutingToken, str] | Drop:
        username = message.username
        server = stun.server_ufrag(username) if username is not None else None
        if server is None:
            return _DROPS[relay_pb2.DROP_REASON_BAD_UFRAG]
        try:
            token = ufrag.decode(server, self.keyring)
        except ufrag.UfragError as exc:
            return _DROPS[_UFRAG_REASONS.get(exc.reason, relay_pb2.DROP_REASON_BAD_UFRAG)]
        if self.verify_message_integrity:
            password = ufrag.password(server, self.keyring, token.key_id)
            if not message.verify_integrity(password.encode("ascii")):
                return _DROPS[relay_pb2.DROP_REASON_BAD_MESSAGE_INTEGRITY]
        return token, server

    def route_transceiver_packet(self, frame: bytes, source: Address) -> Forward | Drop:
        """A frame on the internal socket: only from a known transceiver, only to a client
        that transceiver owns."""
        size = len(frame)
        if source not in self.topology.media_sources:
            self.rx_packets[T2C][_OTHER] += 1
            self.rx_bytes[T2C][_OTHER] += size
            return self._drop(T2C, relay_pb2.DROP_REASON_UNKNOWN_SOURCE, size)
        header_len = (
            framing.HEADER_V6
            if size > _IPV6_FLAG_BYTE and frame[_IPV6_FLAG_BYTE] & framing.FLAG_IPV6
            else framing.HEADER_V4
        )
        binding = self._by_header.get(frame[:header_len])
        if binding is None:
            self.rx_packets[T2C][_OTHER] += 1
            self.rx_bytes[T2C][_OTHER] += size
            try:
                framing.decode(frame)
            except framing.FrameError:
                return self._drop(T2C, relay_pb2.DROP_REASON_BAD_FRAME, size)
            return self._drop(T2C, relay_pb2.DROP_REASON_NO_BINDING, size)
        payload = frame[header_len:]
        size = len(payload)
        kind = _CLASS_OF_FIRST_BYTE[payload[0]] if size else _OTHER
        self.rx_packets[T2C][kind] += 1
        self.rx_bytes[T2C][kind] += size
        if binding.media != source:
            return self._drop(T2C, relay_pb2.DROP_REASON_UNKNOWN_SOURCE, size)
        binding.packets += 1
        binding.bytes += size
        self.fwd_packets[T2C][kind] += 1
        self.fwd_bytes[T2C][kind] += size
        return _new_tuple(Forward, (binding.client, payload, binding.via))

    def count_send_failed(self, direction: int, size: int) -> None:
        self._drop(direction, relay_pb2.DROP_REASON_SEND_FAILED, size)


def make_router(
    settings: RelaySettings,
    keyring: ufrag.Keyring,
    topology: TopologyView,
    *,
    tcp: bool = False,
    replays: ReplayTable | None = None,
) -> Router:
    """A worker's router from the settings; `tcp`: the ICE-TCP plane's own (its table holds
    at most tcp_max_open connections); `replays`: the transaction ids seen, shared by workers."""
    return Router(
        keyring,
        topology,
        idle_timeout_s=settings.idle_timeout_s,
        drain_idle_s=settings.drain_idle_s,
        max_bindings=settings.tcp_max_open if tcp else settings.max_bindings,
        verify_message_integrity=settings.verify_message_integrity,
        tcp=tcp,
        admission=admission_of(settings),
        topology_hold_s=settings.topology_hold_s,
        gone_grace_s=settings.gone_grace_s,
        now=time.monotonic(),
        replays=replays,
    )


def admission_of(settings: RelaySettings) -> Admission:
    """The router's flood and anti-reflection budgets from the settings."""
    return Admission(
        unbound_per_ip=Budget(settings.unbound_pps_per_ip, 2 * settings.unbound_pps_per_ip),
        verifications=Budget(settings.verifications_per_s, settings.verifications_per_s),
        new_addresses_per_ufrag=Budget(
            settings.new_addresses_per_ufrag_per_s, settings.new_addresses_per_ufrag_burst
        ),
        replay_cache_size=settings.replay_cache_size,
    )


def binding_request_for(
    keyring: ufrag.Keyring, cluster_id: int, transceiver_id: int, client_ufrag: str = "cli1"
) -> tuple[bytes, str]:
    """A valid browser-like Binding request for a freshly minted token (tests, benchmark)."""
    server = ufrag.mint(keyring, cluster_id, transceiver_id)
    password = ufrag.password(server, keyring)
    txid = secrets.token_bytes(12)
    return stun.binding_request(f"{server}:{client_ufrag}", password, txid), server
