"""The configured clusters: a TOML file (setting `topology_path`) or the dev default.

```toml
[[clusters]]
id = 1                      # cluster id as encoded in the ICE ufrag, 1 to 2^32-1, unique
name = "fra-1"              # unique, human-readable
region = "eu-central"       # routing hint region
latitude = 50.11            # WGS 84 degrees
longitude = 8.68
capacity_sessions = 5000    # cap over the whole cluster; 0 or absent: transceivers decide
# Public relay VIPs: "ip:port" ("[v6]:port"), or a table placing an anycast/PoP VIP
# elsewhere than the cluster so RouteSession can hand out the one nearest the client.
relay_vips = [
  "203.0.113.10:3478",
  { address = "198.51.100.7:3478", latitude = 48.86, longitude = 2.35 },
  { address = "203.0.113.10:443", transport = "tcp" },  # ICE-TCP (answers: tcptype passive)
]
```
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.geosteer.selection import ClusterConfig, Endpoint, GeoPoint, RelayVip

MAX_CLUSTER_ID = 2**32 - 1

DEV_TOPOLOGY: tuple[ClusterConfig, ...] = (
    ClusterConfig(
        cluster_id=1,
        name="local",
        region="dev",
        location=GeoPoint(50.1109, 8.6821),  # Frankfurt am Main; any point would do
        relay_vips=(RelayVip(Endpoint("127.0.0.1", 3478)),),
        capacity_sessions=1000,
    ),
)

_CLUSTER_KEYS = {"id", "name", "region", "latitude", "longitude", "capacity_sessions", "relay_vips"}
_VIP_KEYS = {"address", "latitude", "longitude", "transport"}


class TopologyError(ValueError):
    """The topology file is unreadable or invalid; the message names the place."""


def parse_endpoint(text: str, where: str) -> Endpoint:
    """'203.0.113.7:3478' or '[2001:db8::1]:3478' -> Endpoint (IP literals only)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise TopologyError(f"{where}: expected ip:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise TopologyError(f"{where}: {host!r} is not an IP address literal") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise TopologyError(f"{where}: port {port_text!r} not in 1..65535")
    return Endpoint(str(ip), int(port_text))


def _number(table: Mapping[str, Any], key: str, where: str) -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def _point(table: Mapping[str, Any], where: str) -> GeoPoint:
    point = GeoPoint(_number(table, "latitude", where), _number(table, "longitude", where))
    if not point.is_valid():
        raise TopologyError(
            f"{where}: coordinates ({point.latitude}, {point.longitude}) out of range "
            "(latitude -90..90, longitude -180..180)"
        )
    return point


def _vip(raw: Any, where: str) -> RelayVip:
    if isinstance(raw, str):
        return RelayVip(parse_endpoint(raw, where))
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - _VIP_KEYS)
        if unknown:
            raise TopologyError(f"{where}: unknown keys {unknown}")
        if not isinstance(raw.get("address"), str):
            raise TopologyError(f"{where}.address: expected 'ip:port'")
        location = _point(raw, where) if "latitude" in raw or "longitude" in raw else None
        transport = raw.get("transport", "udp")
        if transport not in ("udp", "tcp"):
            raise TopologyError(f"{where}.transport: expected 'udp' or 'tcp', got {transport!r}")
        endpoint = parse_endpoint(raw["address"], f"{where}.address")
        if transport == "tcp":  # the relay's ICE-TCP port (RFC 6544 passive candidate)
            endpoint = dataclasses.replace(endpoint, tcp=True)
        return RelayVip(endpoint, location)
    raise TopologyError(f"{where}: expected 'ip:port' or a table, got {raw!r}")


def _cluster(raw: Any, where: str) -> ClusterConfig:
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected a table")
    unknown = sorted(set(raw) - _CLUSTER_KEYS)
    if unknown:
        raise TopologyError(f"{where}: unknown keys {unknown}")
    cluster_id = raw.get("id")
    if isinstance(cluster_id, bool) or not isinstance(cluster_id, int):
        raise TopologyError(f"{where}.id: expected an integer")
    if not 1 <= cluster_id <= MAX_CLUSTER_ID:
        raise TopologyError(f"{where}.id: {cluster_id} not in 1..{MAX_CLUSTER_ID}")
    where = f"cluster {cluster_id}"
    name, region = raw.get("name"), raw.get("region", "")
    if not isinstance(name, str) or not name:
        raise TopologyError(f"{where}.name: expected a non-empty string")
    if not isinstance(region, str):
        raise TopologyError(f"{where}.region: expected a string")
    capacity = raw.get("capacity_sessions", 0)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise TopologyError(f"{where}.capacity_sessions: expected an integer >= 0")
    vips_raw = raw.get("relay_vips", [])
    if not isinstance(vips_raw, list):
        raise TopologyError(f"{where}.relay_vips: expected a list")
    vips = tuple(_vip(v, f"{where}.relay_vips[{i}]") for i, v in enumerate(vips_raw))
    if len({v.endpoint for v in vips}) != len(vips):
        raise TopologyError(f"{where}.relay_vips: duplicate endpoint")
    return ClusterConfig(
        cluster_id=cluster_id,
        name=name,
        region=region,
        location=_point(raw, where),
        relay_vips=vips,
        capacity_sessions=capacity,
    )


def parse_topology(data: Mapping[str, Any]) -> tuple[ClusterConfig, ...]:
    """Validates a decoded TOML document; clusters come back ordered by id."""
    unknown = sorted(set(data) - {"clusters"})
    if unknown:
        raise TopologyError(f"unknown top-level keys {unknown}")
    raw = data.get("clusters")
    if not isinstance(raw, list) or not raw:
        raise TopologyError("clusters: expected at least one [[clusters]] table")
    clusters = [_cluster(c, f"clusters[{i}]") for i, c in enumerate(raw)]
    _unique([c.cluster_id for c in clusters], "cluster id")
    _unique([c.name for c in clusters], "cluster name")
    return tuple(sorted(clusters, key=lambda c: c.cluster_id))


def _unique(values: Sequence[object], what: str) -> None:
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise TopologyError(f"duplicate {what} {value!r}")
        seen.add(value)


def load_topology(path: str) -> tuple[ClusterConfig, ...]:
    """The topology in `path`, or the dev topology when `path` is empty."""
    if not path:
        return DEV_TOPOLOGY
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TopologyError(f"topology file {path}: {exc}") from None
    try:
        return parse_topology(data)
    except TopologyError as exc:
        raise TopologyError(f"topology file {path}: {exc}") from None
