"""Settings of the relay service (flags, TOML file, VOICEEDGE_RELAY_* environment)."""

from __future__ import annotations

import dataclasses
import ipaddress

from libs.config.settings import ServiceSettings, SettingsError, parse_host_port
from libs.wire import ufrag
from libs.wire.ufrag import DEV_KEYRING_SPEC


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelaySettings(ServiceSettings):
    """Settings of the relay service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50054",
        metadata={"help": "host:port of the admin gRPC server (port 0: any free)"},
    )
    udp_listen: tuple[str, ...] = dataclasses.field(
        default=("127.0.0.1:3478",),
        metadata={
            "help": "public UDP host:port list (the VIPs; IPv4 and [IPv6]); comma-separated, "
            "port 0: any free"
        },
    )
    internal_listen: str = dataclasses.field(
        default="127.0.0.1:0",
        metadata={"help": "host:port of the internal UDP socket facing the transceivers"},
    )
    workers: int = dataclasses.field(
        default=0,
        metadata={
            "help": "worker processes sharing the public port with SO_REUSEPORT; 0: one per CPU "
            "of the cgroup quota and affinity"
        },
    )
    ufrag_keys: str = dataclasses.field(
        default=DEV_KEYRING_SPEC,
        metadata={"help": "ufrag keyring '<id>:<hex secret>,...' (default: the dev key)"},
    )
    cluster_id: int = dataclasses.field(
        default=1,
        metadata={
            "help": "the cluster this relay belongs to: it registers there with geosteer "
            "(see public_advertise)"
        },
    )
    transceivers: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": "static topology: '<cluster>/<transceiver>=<ip>:<port>' media addresses, "
            "comma-separated"
        },
    )
    geosteer_address: str = dataclasses.field(
        default="",
        metadata={"help": "host:port of geosteer to watch the topology from; empty: static only"},
    )
    public_advertise: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": "public UDP host:port list clients are told to use (the VIPs); when set, "
            "the relay registers them with geosteer in cluster_id and heartbeats, and stops "
            "being advertised once it drains; empty: no registration"
        },
    )
    node_id: str = dataclasses.field(
        default="",
        metadata={"help": "id of this relay in geosteer; empty: relay-<cluster_id>-<host>-<pid>"},
    )
    redis_url: str = dataclasses.field(
        default="",
        metadata={"help": "redis://host:port/db for the shared binding copy; empty: memory only"},
    )
    binding_ttl_s: float = dataclasses.field(
        default=30.0, metadata={"help": "TTL of the Redis copy of a binding"}
    )
    idle_timeout_s: float = dataclasses.field(
        default=30.0, metadata={"help": "a binding with no traffic for this long is forgotten"}
    )
    drain_idle_s: float = dataclasses.field(
        default=8.0,
        metadata={
            "help": "while draining, a binding this long without packets no longer holds the "
            "drain (above the ~5 s ICE consent interval, so a silent live call still does)"
        },
    )
    max_bindings: int = dataclasses.field(
        default=1_000_000,
        metadata={"help": "bindings held in memory; beyond it the least recently used goes"},
    )
    verify_message_integrity: bool = dataclasses.field(
        default=True,
        metadata={"help": "check STUN MESSAGE-INTEGRITY with the ufrag-derived password"},
    )
    batched_io: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "move datagrams with the native recvmmsg/sendmmsg extension when it is "
            "built (routing stays in Python); false: plain asyncio datagram endpoints"
        },
    )
    redis_timeout_s: float = dataclasses.field(
        default=0.5, metadata={"help": "timeout of one Redis operation"}
    )
    redis_max_inflight: int = dataclasses.field(
        default=256, metadata={"help": "concurrent Redis lookups for unbound clients"}
    )

    def validate(self) -> None:
        super().validate()
        if not self.udp_listen:
            raise SettingsError("udp_listen: at least one address is needed")
        for address in self.udp_listen:
            parse_host_port(address, "udp_listen")
        parse_host_port(self.internal_listen, "internal_listen")
        if self.geosteer_address:
            parse_host_port(self.geosteer_address, "geosteer_address")
        for address in self.public_advertise:
            host, port = parse_host_port(address, "public_advertise")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise SettingsError(f"public_advertise: not an IP literal: {address!r}") from None
            if port == 0:
                raise SettingsError(f"public_advertise: port 0 in {address!r}")
        if self.public_advertise and not self.geosteer_address:
            raise SettingsError("public_advertise: registering needs geosteer_address")
        if self.workers < 0:
            raise SettingsError("workers: must be >= 0")
        try:
            ufrag.Keyring.parse(self.ufrag_keys)
        except ValueError as exc:
            raise SettingsError(f"ufrag_keys: {exc}") from None
        if not 0 <= self.cluster_id <= 0xFFFF:
            raise SettingsError("cluster_id: must be 0-65535")
        for entry in self.transceivers:
            parse_transceiver_entry(entry)
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("redis_url: expected redis://host:port[/db]")
        for name in ("binding_ttl_s", "idle_timeout_s", "drain_idle_s", "redis_timeout_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be > 0")
        if self.max_bindings < 1:
            raise SettingsError("max_bindings: must be >= 1")
        if self.redis_max_inflight < 1:
            raise SettingsError("redis_max_inflight: must be >= 1")


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
