"""Settings of the relay service (flags, TOML file, VOICEEDGE_RELAY_* environment)."""

from __future__ import annotations

import dataclasses
import ipaddress

from libs.config.settings import (
    ServiceSettings,
    SettingsError,
    host_port,
    parse_host_port,
    redis_url,
    setting,
)
from libs.wire import ufrag
from libs.wire.ufrag import DEV_KEYRING_SPEC
from services.geosteer.target import geosteer_target

NATIVE_PATHS = ("auto", "on", "off")


def _keyring(spec: str) -> object:
    return ufrag.Keyring.parse(spec)


def _public_endpoint(address: str) -> tuple[str, int]:
    host, port = host_port(address)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP literal: {address!r}") from None
    if port == 0:
        raise ValueError(f"port 0 in {address!r}")
    return host, port


def parse_transceiver_entry(entry: str) -> tuple[int, int, str, int]:
    """`'1/2=127.0.0.1:40000'` -> (cluster 1, transceiver 2, ip, port); SettingsError if bad."""
    ids, sep, address = entry.partition("=")
    cluster_text, slash, transceiver_text = ids.partition("/")
    if not sep or not slash:
        raise SettingsError(
            f"transceivers: expected <cluster>/<transceiver>=<ip>:<port>: {entry!r}"
        )
    try:
        cluster_id, transceiver_id = int(cluster_text), int(transceiver_text)
    except ValueError:
        raise SettingsError(f"transceivers: ids must be numbers: {entry!r}") from None
    if not (0 <= cluster_id <= 0xFFFF and 0 <= transceiver_id <= 0xFFFF):
        raise SettingsError(f"transceivers: ids are 16-bit: {entry!r}")
    host, port = parse_host_port(address, "transceivers")
    if port == 0:
        raise SettingsError(f"transceivers: port 0 in {entry!r}")
    return cluster_id, transceiver_id, host, port


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelaySettings(ServiceSettings):
    """Settings of the relay service."""

    grpc_listen: str = setting(
        "127.0.0.1:50054", "host:port of the admin gRPC server (port 0: any free)", parse=host_port
    )
    udp_listen: tuple[str, ...] = setting(
        ("127.0.0.1:3478",),
        "public UDP host:port list (the VIPs; IPv4 and [IPv6]); comma-separated, port 0: any free",
        parse=host_port,
        nonempty=True,
    )
    internal_listen: str = setting(
        "127.0.0.1:0",
        "host:port of the internal UDP socket facing the transceivers",
        parse=host_port,
    )
    workers: int = setting(
        0,
        "worker processes sharing the public port with SO_REUSEPORT; 0: one per CPU of the "
        "cgroup quota and affinity",
        ge=0,
    )
    ufrag_keys: str = setting(
        DEV_KEYRING_SPEC,
        "ufrag keyring '<id>:<hex secret>,...' (default: the dev key)",
        parse=_keyring,
    )
    cluster_id: int = setting(
        1,
        "the cluster this relay belongs to: it registers there with geosteer (see "
        "public_advertise)",
        ge=0,
        le=0xFFFF,
    )
    transceivers: tuple[str, ...] = setting(
        (),
        "static topology: '<cluster>/<transceiver>=<ip>:<port>' media addresses, comma-separated",
        parse=parse_transceiver_entry,
    )
    geosteer_address: str = setting(
        "",
        "geosteer to watch the topology from and register with: host:port, a DNS name with "
        "every replica's address, or comma-separated IP:port of each replica; empty: static "
        "only",
        parse=geosteer_target,
        optional=True,
    )
    public_advertise: tuple[str, ...] = setting(
        (),
        "public UDP host:port list clients are told to use (the VIPs, IP literals); when set, "
        "the relay registers them with geosteer in cluster_id and heartbeats, and stops "
        "being advertised once it drains; empty: no registration",
        parse=_public_endpoint,
    )
    node_id: str = setting(
        "", "id of this relay in geosteer; empty: relay-<cluster_id>-<host>-<pid>"
    )
    tcp_listen: str = setting(
        "127.0.0.1:443",
        "public ICE-TCP host:port (RFC 6544 passive candidates, RFC 4571 framing), shared by "
        "the workers with SO_REUSEPORT; port 0: any free; empty: no TCP",
        parse=host_port,
        optional=True,
    )
    tcp_advertise: tuple[str, ...] = setting(
        (),
        "public TCP host:port list clients are told to use (answers carry them as tcptype "
        "passive candidates below the UDP ones); registered with geosteer beside "
        "public_advertise",
        parse=_public_endpoint,
    )
    tcp_first_frame_timeout_s: float = setting(
        2.0, "a TCP connection without a valid first STUN frame this long is closed", gt=0
    )
    tcp_max_frame_bytes: int = setting(
        2048, "a TCP frame (RFC 4571 length) above this closes the connection", ge=20, le=65535
    )
    tcp_max_pending: int = setting(
        1024, "TCP connections awaiting their first frame, in all (per worker)", ge=1
    )
    tcp_max_pending_per_ip: int = setting(
        8, "TCP connections awaiting their first frame, per client IP (per worker)", ge=1
    )
    tcp_max_open: int = setting(20_000, "open (verified) TCP connections (per worker)", ge=1)
    tcp_max_open_per_ip: int = setting(
        256, "open (verified) TCP connections per client IP (per worker)", ge=1
    )
    redis_url: str = setting(
        "",
        "redis://host:port/db for the shared binding copy; empty: memory only",
        parse=redis_url,
        optional=True,
    )
    binding_ttl_s: float = setting(30.0, "TTL of the Redis copy of a binding", gt=0)
    idle_timeout_s: float = setting(
        30.0, "a binding with no traffic for this long is forgotten", gt=0
    )
    drain_idle_s: float = setting(
        8.0,
        "while draining, a binding this long without packets no longer holds the drain "
        "(above the ~5 s ICE consent interval, so a silent live call still does)",
        gt=0,
    )
    max_bindings: int = setting(
        1_000_000, "bindings held in memory; beyond it the least recently used goes", ge=1
    )
    verify_message_integrity: bool = setting(
        True, "check STUN MESSAGE-INTEGRITY with the ufrag-derived password"
    )
    batched_io: bool = setting(
        True,
        "move datagrams with the native recvmmsg/sendmmsg extension when it is built (routing "
        "stays in Python); false: plain asyncio datagram endpoints",
    )
    native_path: str = setting(
        "auto",
        "the C per-packet path for bound UDP clients (services/relay/native): auto (when "
        "relaycore.so is built), on (required: fail at start without it) or off (the Python "
        "router for every packet)",
        choices=NATIVE_PATHS,
    )
    udp_gso: bool = setting(
        False,
        "native path: send runs of equal-size frames to one transceiver as one UDP_SEGMENT "
        "(GSO) message; switched off by itself (counted) where the kernel refuses it",
    )
    redis_timeout_s: float = setting(0.5, "timeout of one Redis operation", gt=0)
    redis_max_inflight: int = setting(
        256,
        "concurrent Redis lookups for unbound clients; the native path also asks for at "
        "most this many a second per worker",
        ge=1,
    )
    topology_hold_s: float = setting(
        300.0,
        "a transceiver missing from geosteer's answers stays routable this long after it was "
        "last named, and for as long as it has bindings (geosteer restarts, drained callers)",
        gt=0,
    )
    gone_grace_s: float = setting(
        10.0,
        "a transceiver that left geosteer's topology (deregistered after its drain, or "
        "declared dead) stays routable this long, bindings or not; then its callers' "
        "bindings go (their Redis copies expire)",
        ge=0,
    )
    preload_timeout_s: float = setting(
        5.0,
        "at start, how long reading the Redis copy of bindings and topology may take before "
        "the sockets open anyway",
        gt=0,
    )
    recall_bindings: bool = setting(
        True,
        "at start, ask every transceiver of the topology for the clients it carries through "
        "this relay's host and install them (proven with each session's ICE password): a "
        "restart without Redis keeps its calls' media",
    )
    unbound_pps_per_ip: float = setting(
        200.0,
        "STUN (and, apart, DTLS/SRTP) packets per second from addresses without a binding, "
        "per source IP (IPv6: per /64), burst twice that; beyond it dropped before any "
        "parsing or HMAC",
        gt=0,
    )
    verifications_per_s: float = setting(
        5000.0,
        "per worker, ufrag and MESSAGE-INTEGRITY checks per second of Binding requests from "
        "unbound addresses (burst the same); beyond it dropped as overloaded (on the native "
        "path in C, before any parsing)",
        gt=0,
    )
    new_addresses_per_ufrag_burst: int = setting(
        8,
        "client addresses one server ufrag may bind at once (candidates, NAT rebinding); "
        "refilled at new_addresses_per_ufrag_per_s",
        ge=1,
    )
    new_addresses_per_ufrag_per_s: float = setting(
        0.5, "refill rate of new_addresses_per_ufrag_burst", gt=0
    )
    replay_cache_size: int = setting(
        65536,
        "STUN transaction ids remembered per worker: a request seen again from another "
        "address is a replay and is dropped",
        ge=1,
    )

    def validate(self) -> None:
        super().validate()
        if self.public_advertise and not self.geosteer_address:
            raise SettingsError("public_advertise: registering needs geosteer_address")
        if self.tcp_advertise and not self.public_advertise:
            raise SettingsError("tcp_advertise: registering needs public_advertise")
        if self.tcp_advertise and not self.tcp_listen:
            raise SettingsError("tcp_advertise: needs tcp_listen")
