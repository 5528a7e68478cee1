"""Topology file parsing and validation, and the geosteer settings checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libs.config.settings import SettingsError, load_settings
from services.geosteer.selection import Endpoint, GeoPoint
from services.geosteer.settings import GeosteerSettings
from services.geosteer.topology import DEV_TOPOLOGY, TopologyError, load_topology, parse_topology

GOOD = """
[[clusters]]
id = 2
name = "syd-1"
region = "apac"
latitude = -33.87
longitude = 151.21
relay_vips = ["[2001:db8::1]:3478"]

[[clusters]]
id = 1
name = "fra-1"
region = "eu-central"
latitude = 50.11
longitude = 8.68
capacity_sessions = 500
relay_vips = [
  "203.0.113.1:3478",
  { address = "198.51.100.1:443", latitude = 48.86, longitude = 2.35 },
  { address = "203.0.113.1:443", transport = "tcp" },
]
"""


def test_loads_a_topology_file_ordered_by_id(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(GOOD)
    fra, syd = load_topology(str(path))
    assert (fra.cluster_id, fra.name, fra.capacity_sessions) == (1, "fra-1", 500)
    assert [v.endpoint for v in fra.relay_vips] == [
        Endpoint("203.0.113.1", 3478),
        Endpoint("198.51.100.1", 443),
        Endpoint("203.0.113.1", 443, tcp=True),  # the ICE-TCP VIP
    ]
    assert fra.relay_vips[1].location == GeoPoint(48.86, 2.35)
    assert syd.relay_vips[0].endpoint == Endpoint("2001:db8::1", 3478)


def test_empty_path_is_the_dev_topology() -> None:
    assert load_topology("") == DEV_TOPOLOGY
    (local,) = DEV_TOPOLOGY
    assert (local.cluster_id, local.name, local.region) == (1, "local", "dev")
    assert local.relay_vips[0].endpoint == Endpoint("127.0.0.1", 3478)


def cluster(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 1,
        "name": "a",
        "latitude": 1.0,
        "longitude": 2.0,
        "relay_vips": ["203.0.113.1:3478"],
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "expected at least one"),
        ({"clusters": [cluster(), cluster(name="b")]}, "duplicate cluster id 1"),
        ({"clusters": [cluster(), cluster(id=2)]}, "duplicate cluster name 'a'"),
        (
            {"clusters": [cluster(latitude=91.0)]},
            r"cluster 1: coordinates \(91.0, 2.0\) out of range",
        ),
        ({"clusters": [cluster(longitude=-181)]}, "out of range"),
        ({"clusters": [cluster(latitude="north")]}, "cluster 1.latitude: expected a number"),
        ({"clusters": [cluster(relay_vips=["vip.example:3478"])]}, "not an IP address literal"),
        ({"clusters": [cluster(relay_vips=["203.0.113.1"])]}, "expected ip:port"),
        ({"clusters": [cluster(relay_vips=["203.0.113.1:0"])]}, r"port '0' not in 1..65535"),
        (
            {"clusters": [cluster(relay_vips=["203.0.113.1:1", "203.0.113.1:1"])]},
            "duplicate endpoint",
        ),
        (
            {"clusters": [cluster(relay_vips=[{"address": "203.0.113.1:1", "transport": "sctp"}])]},
            "transport: expected 'udp' or 'tcp'",
        ),
        ({"clusters": [cluster(id=0)]}, "clusters\\[0\\].id: 0 not in"),
        ({"clusters": [cluster(id=True)]}, "expected an integer"),
        ({"clusters": [cluster(capacity=3)]}, "unknown keys \\['capacity'\\]"),
        ({"clusters": [cluster(capacity_sessions=-1)]}, "capacity_sessions"),
        ({"clusters": [cluster(name="")]}, "name: expected a non-empty string"),
        ({"clusters": [cluster()], "extra": 1}, "unknown top-level keys"),
    ],
)
def test_invalid_topologies_are_clear_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(data)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[clusters]\n")
    with pytest.raises(TopologyError, match=f"topology file {path}"):
        load_topology(str(path))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"heartbeat_ttl_ms": 1000, "heartbeat_interval_ms": 1000}, "heartbeat_ttl_ms"),
        ({"heartbeat_interval_ms": 1}, "heartbeat_interval_ms"),
        ({"default_latitude": 100.0}, "default_latitude"),
        ({"rtt_ewma_alpha": 0.0}, "rtt_ewma_alpha"),
        ({"rtt_max_prefixes": 0}, "rtt_max_prefixes"),
        ({"default_cluster_id": 7}, "default_cluster_id: 7 is not in the topology"),
        ({"geoip_db_path": "/nonexistent.mmdb"}, "geoip_db_path: no such file"),
        ({"topology_path": "/nonexistent.toml"}, "topology_path: topology file /nonexistent"),
    ],
)
def test_bad_settings(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        GeosteerSettings(**fields).validate()


def test_the_registry_goes_to_redis_by_url() -> None:
    settings = load_settings(
        GeosteerSettings,
        [],
        env_prefix="VOICEEDGE_GEOSTEER_",
        prog="geosteer",
        description="d",
        environ={"VOICEEDGE_GEOSTEER_REDIS_URL": "redis://127.0.0.1:6379/0"},
    )
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    with pytest.raises(SettingsError, match="redis_url: expected redis://"):
        GeosteerSettings(redis_url="127.0.0.1:6379").validate()


def test_default_settings_are_valid() -> None:
    GeosteerSettings().validate()
