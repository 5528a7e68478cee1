"""Table tests of the pure route selection and the RTT table."""

from __future__ import annotations

import dataclasses

import pytest

from services.geosteer.rtt import (
    RttSampleError,
    RttTable,
    area_key,
    client_prefix,
    normalize_prefix,
)
from services.geosteer.selection import (
    ClusterConfig,
    ClusterState,
    Endpoint,
    GeoPoint,
    NodeKind,
    NodeState,
    NoRouteError,
    RelayVip,
    RouteHints,
    RttSource,
    SwitchMargin,
    estimate_rtt_ms,
    haversine_km,
    select_route,
)

FRANKFURT = GeoPoint(50.1109, 8.6821)
SYDNEY = GeoPoint(-33.8688, 151.2093)
NOW = 1000.0
TTL = 6.0

CONFIGS = {
    "fra": ClusterConfig(1, "fra-1", "eu-central", GeoPoint(50.1, 8.7)),
    "ams": ClusterConfig(2, "ams-1", "eu-west", GeoPoint(52.37, 4.90)),
    "syd": ClusterConfig(3, "syd-1", "apac", GeoPoint(-33.87, 151.21)),
    "iad": ClusterConfig(4, "iad-1", "us-east", GeoPoint(38.95, -77.45)),
}


def transceiver(
    cluster_id: int,
    tid: int,
    *,
    active: int = 0,
    capacity: int = 10,
    draining: bool = False,
    last_seen: float = NOW,
) -> NodeState:
    return NodeState(
        node_id=f"t{cluster_id}-{tid}",
        kind=NodeKind.TRANSCEIVER,
        cluster_id=cluster_id,
        expires_at=last_seen + TTL,
        transceiver_id=tid,
        grpc_address=f"127.0.0.1:{6000 + tid}",
        media_address=Endpoint("127.0.0.1", 7000 + tid),
        capacity_sessions=capacity,
        active_sessions=active,
        draining=draining,
    )


def cluster(name: str, *nodes: NodeState, cap: int = 0) -> ClusterState:
    config = CONFIGS[name]
    vip = RelayVip(Endpoint(f"203.0.113.{config.cluster_id}", 3478))
    config = dataclasses.replace(config, relay_vips=(vip,), capacity_sessions=cap)
    return ClusterState(config, nodes)


def world(**overrides: tuple[NodeState, ...]) -> list[ClusterState]:
    """Every cluster with one idle transceiver unless overridden."""
    ids = {name: c.cluster_id for name, c in CONFIGS.items()}
    return [
        cluster(name, *overrides.get(name, (transceiver(cid, 1),))) for name, cid in ids.items()
    ]


@pytest.mark.parametrize(
    ("case", "clusters", "client", "now", "expected"),
    [
        ("frankfurt lands in fra", world(), FRANKFURT, NOW, 1),
        ("sydney lands in syd (apac)", world(), SYDNEY, NOW, 3),
        (
            "fra full spills to ams",
            world(fra=(transceiver(1, 1, active=10), transceiver(1, 2, active=10))),
            FRANKFURT,
            NOW,
            2,
        ),
        (
            "fra draining spills to ams",
            world(fra=(transceiver(1, 1, draining=True),)),
            FRANKFURT,
            NOW,
            2,
        ),
        (
            "fra stops heartbeating: fails over once the ttl passed",
            world(
                fra=(transceiver(1, 1, last_seen=NOW),),
                ams=(transceiver(2, 1, last_seen=NOW + 1),),
                syd=(transceiver(3, 1, last_seen=NOW + 1),),
                iad=(transceiver(4, 1, last_seen=NOW + 1),),
            ),
            FRANKFURT,
            NOW + TTL + 0.001,
            2,
        ),
        (
            "fra heartbeat still within ttl: stays",
            world(),
            FRANKFURT,
            NOW + TTL - 0.001,
            1,
        ),
        (
            "fra and ams gone: next nearest is iad",
            world(fra=(), ams=(transceiver(2, 1, draining=True),)),
            FRANKFURT,
            NOW,
            4,
        ),
        ("unknown location: least loaded, then lowest id", world(), None, NOW, 1),
    ],
)
def test_select_cluster(
    case: str, clusters: list[ClusterState], client: GeoPoint | None, now: float, expected: int
) -> None:
    decision = select_route(clusters, client, now)
    assert decision.cluster.cluster_id == expected, case


def test_cluster_cap_counts_as_full() -> None:
    fra = cluster("fra", transceiver(1, 1, active=5, capacity=100), cap=5)
    ams = cluster("ams", transceiver(2, 1))
    assert select_route([fra, ams], FRANKFURT, NOW).cluster.cluster_id == 2


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        (RouteHints(preferred_region="apac"), 3),
        (RouteHints(preferred_cluster_id=4), 4),
        (RouteHints(preferred_cluster_id=4, preferred_region="apac"), 4),
        (RouteHints(excluded_cluster_ids=frozenset({1})), 2),
        (RouteHints(preferred_region="nowhere"), 1),
    ],
)
def test_hints(hints: RouteHints, expected: int) -> None:
    assert select_route(world(), FRANKFURT, NOW, hints=hints).cluster.cluster_id == expected


def test_no_cluster_left_raises() -> None:
    with pytest.raises(NoRouteError, match=r"no healthy cluster.*excluded clusters: 1,2,3,4"):
        select_route(
            world(), FRANKFURT, NOW, hints=RouteHints(excluded_cluster_ids=frozenset({1, 2, 3, 4}))
        )
    with pytest.raises(NoRouteError):
        select_route(world(fra=(), ams=(), syd=(), iad=()), FRANKFURT, NOW)


def test_transceivers_ranked_by_load_without_full_or_draining_ones() -> None:
    fra = cluster(
        "fra",
        transceiver(1, 1, active=8),
        transceiver(1, 2, active=2),
        transceiver(1, 3, active=10),
        transceiver(1, 4, draining=True),
        transceiver(1, 5, active=5),
        transceiver(1, 6, last_seen=NOW - TTL - 1),
    )
    decision = select_route([fra], FRANKFURT, NOW)
    assert [t.transceiver_id for t in decision.transceivers] == [2, 5, 1]


def test_cluster_without_relay_vip_is_unhealthy() -> None:
    bare = ClusterState(CONFIGS["fra"], (transceiver(1, 1),))
    assert not bare.is_healthy(NOW)
    assert (
        select_route([bare, cluster("ams", transceiver(2, 1))], FRANKFURT, NOW).cluster.cluster_id
        == 2
    )


def test_relay_vip_nearest_the_client_first() -> None:
    paris = RelayVip(Endpoint("198.51.100.1", 3478), GeoPoint(48.86, 2.35))
    sydney = RelayVip(Endpoint("198.51.100.2", 3478), SYDNEY)
    home = RelayVip(Endpoint("198.51.100.3", 3478))
    relay = NodeState(
        node_id="r1",
        kind=NodeKind.RELAY,
        cluster_id=1,
        expires_at=NOW + TTL,
        public_endpoints=(Endpoint("198.51.100.4", 3478),),
    )
    config = dataclasses.replace(CONFIGS["fra"], relay_vips=(sydney, paris, home))
    state = ClusterState(config, (transceiver(1, 1), relay))
    near_fra = select_route([state], FRANKFURT, NOW).relay_endpoints
    assert [e.ip for e in near_fra] == [
        "198.51.100.3",
        "198.51.100.4",
        "198.51.100.1",
        "198.51.100.2",
    ]
    near_syd = select_route([state], SYDNEY, NOW).relay_endpoints
    assert near_syd[0].ip == "198.51.100.2"


def relay(cluster_id: int, ip: str, *, draining: bool = False) -> NodeState:
    return NodeState(
        node_id=f"r{cluster_id}-{ip}",
        kind=NodeKind.RELAY,
        cluster_id=cluster_id,
        expires_at=NOW + TTL,
        public_endpoints=(Endpoint(ip, 3478),),
        draining=draining,
    )


def test_a_nearer_relay_of_another_cluster_goes_first() -> None:
    """fra is full: the Frankfurt caller's transceiver is in ams (or iad), but media enters
    at fra's relay, the shortest first hop; a cluster without a live relay offers none.
    Nearer by more than the margin (5 against 11 ms), fra's VIP is the only one offered;
    within it, ams's own follows as a fallback."""
    fra_relay = relay(1, "198.51.100.10")
    fra = ClusterState(CONFIGS["fra"], (transceiver(1, 1, active=10), fra_relay))
    ams = cluster("ams", transceiver(2, 1))
    decision = select_route([fra, ams], FRANKFURT, NOW)
    assert decision.cluster.cluster_id == 2
    assert [str(e) for e in decision.relay_endpoints] == ["198.51.100.10:3478"]
    wide = SwitchMargin(slack_ms=10.0)
    decision = select_route([fra, ams], FRANKFURT, NOW, margin=wide)
    assert [str(e) for e in decision.relay_endpoints] == ["198.51.100.10:3478", "203.0.113.2:3478"]
    # A draining relay is not offered; nor is another cluster's farther relay.
    fra_draining = ClusterState(CONFIGS["fra"], (relay(1, "198.51.100.10", draining=True),))
    iad = ClusterState(CONFIGS["iad"], (relay(4, "198.51.100.40"),))
    decision = select_route([fra_draining, ams, iad], FRANKFURT, NOW)
    assert [str(e) for e in decision.relay_endpoints] == ["203.0.113.2:3478"]


def test_a_relay_pop_nearer_than_the_transceivers_own_relay_is_the_only_vip() -> None:
    """Perth: the Sydney PoP (no transceivers) is the shortest first hop, 54 ms against
    Singapore's 64 ms estimate. Listed together, ICE would take Singapore's relay (its
    check, not through Sydney, answers first), so the answer has the PoP's VIPs only (UDP
    and ICE-TCP); another PoP within the margin of the nearest is kept."""
    perth = GeoPoint(-31.95, 115.86)
    sin_config = ClusterConfig(5, "sin-1", "apac", GeoPoint(1.35, 103.82))
    sin = ClusterState(sin_config, (transceiver(5, 1), relay(5, "198.51.100.50")))
    pop_relay = dataclasses.replace(
        relay(3, "198.51.100.30"),
        public_endpoints=(Endpoint("198.51.100.30", 3478), Endpoint("198.51.100.30", 443, True)),
    )
    pop = ClusterState(CONFIGS["syd"], (pop_relay,))
    decision = select_route([sin, pop], perth, NOW)
    assert decision.cluster.cluster_id == 5
    assert [str(e) for e in decision.relay_endpoints] == ["198.51.100.30:3478", "198.51.100.30:443"]
    melbourne = ClusterState(
        ClusterConfig(6, "mel-pop", "apac", GeoPoint(-37.81, 144.96)), (relay(6, "198.51.100.60"),)
    )
    # A second PoP nearer still (46 ms): Sydney's (54) is past the margin of it.
    decision = select_route([sin, pop, melbourne], perth, NOW)
    assert [e.ip for e in decision.relay_endpoints] == ["198.51.100.60"]
    wide = SwitchMargin(slack_ms=10.0)
    decision = select_route([sin, pop, melbourne], perth, NOW, margin=wide)
    assert [str(e) for e in decision.relay_endpoints] == [
        "198.51.100.60:3478",
        "198.51.100.30:3478",
        "198.51.100.30:443",
    ]
    # Measured for Perth's prefix, Singapore's own relay is as near: both, own VIP last.
    decision = select_route([sin, pop], perth, NOW, {5: 56.0})
    assert [str(e) for e in decision.relay_endpoints] == [
        "198.51.100.30:3478",
        "198.51.100.30:443",
        "198.51.100.50:3478",
    ]


def test_measured_rtt_ranks_relay_vips_too() -> None:
    """The nearest relay by distance (fra) is slow for this prefix: its VIP is not offered
    ahead of the chosen cluster's."""
    fra = ClusterState(CONFIGS["fra"], (relay(1, "198.51.100.10"),))
    ams = cluster("ams", transceiver(2, 1))
    decision = select_route([fra, ams], FRANKFURT, NOW, {1: 90.0})
    assert [str(e) for e in decision.relay_endpoints] == ["203.0.113.2:3478"]


@pytest.mark.parametrize(
    ("a", "b", "km"),
    [
        (FRANKFURT, FRANKFURT, 0.0),
        (FRANKFURT, SYDNEY, 16_480.0),
        (GeoPoint(0, 0), GeoPoint(0, 180), 20_015.0),
    ],
)
def test_haversine(a: GeoPoint, b: GeoPoint, km: float) -> None:
    assert haversine_km(a, b) == pytest.approx(km, rel=0.005, abs=0.5)


def test_rtt_model() -> None:
    assert estimate_rtt_ms(FRANKFURT, FRANKFURT) == pytest.approx(5.0)
    assert 240 < estimate_rtt_ms(FRANKFURT, SYDNEY) < 260


def test_measured_rtt_beats_the_estimate() -> None:
    """ams is farther than fra by distance, but transceivers measured it faster."""
    rtt = RttTable()
    rtt.observe("194.25.0.0/24", 1, 40.0, 5)
    rtt.observe("194.25.0.0/24", 2, 12.0, 5)
    measured = rtt.lookup("194.25.0.77")
    decision = select_route(world(), FRANKFURT, NOW, measured)
    assert decision.cluster.cluster_id == 2
    assert decision.rtt_source is RttSource.MEASURED
    assert decision.estimated_rtt_ms == pytest.approx(12.0)
    # Another prefix has no measurements: geography decides.
    other = select_route(world(), FRANKFURT, NOW, rtt.lookup("194.25.1.1"))
    assert (other.cluster.cluster_id, other.rtt_source) == (1, RttSource.GEO)


@pytest.mark.parametrize(
    ("case", "measured", "margin", "expected"),
    [
        ("ams measured 9 ms: fra's 5 ms estimate is not 5 ms better", {2: 9.0}, None, 2),
        ("without a margin it flips to the estimate", {2: 9.0}, SwitchMargin(0.0, 0.0), 1),
        ("ams measured 11 ms: fra's estimate is more than 5 ms better", {2: 11.0}, None, 1),
        ("a bad route (fra measured 300 ms) is left at once", {1: 300.0}, None, 2),
    ],
)
def test_an_estimate_must_beat_a_measurement_by_the_switch_margin(
    case: str, measured: dict[int, float], margin: SwitchMargin | None, expected: int
) -> None:
    decision = select_route(world(), FRANKFURT, NOW, measured, margin=margin or SwitchMargin())
    assert decision.cluster.cluster_id == expected, case


def test_rtt_ewma_and_sample_weight() -> None:
    rtt = RttTable(alpha=0.5)
    rtt.observe("10.0.0.0/24", 1, 100.0)
    rtt.observe("10.0.0.0/24", 1, 50.0)
    assert rtt.lookup("10.0.0.1")[1] == pytest.approx(75.0)
    rtt.observe("10.0.0.0/24", 1, 25.0, sample_count=2)  # weight 1 - 0.5^2 = 0.75
    assert rtt.lookup("10.0.0.1")[1] == pytest.approx(75.0 - 0.75 * 50.0)


def test_rtt_table_is_lru_bounded() -> None:
    rtt = RttTable(max_prefixes=2)
    rtt.observe("10.0.1.0/24", 1, 10.0)
    rtt.observe("10.0.2.0/24", 1, 10.0)
    rtt.observe("10.0.1.0/24", 1, 10.0)  # touches 10.0.1/24: 10.0.2/24 is now oldest
    rtt.observe("10.0.3.0/24", 1, 10.0)
    assert len(rtt) == 2
    assert rtt.lookup("10.0.2.1") == {}
    assert rtt.lookup("10.0.1.1") == {1: 10.0}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("203.0.113.77/32", "203.0.113.0/24"),
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:1:2::/64", "2001:db8:1::/48"),
    ],
)
def test_normalize_prefix(prefix: str, expected: str) -> None:
    assert normalize_prefix(prefix) == expected


@pytest.mark.parametrize(
    ("prefix", "rtt_ms"),
    [
        ("10.0.0.0/16", 10.0),
        ("garbage", 10.0),
        ("10.0.0.0/24", -1.0),
        ("10.0.0.0/24", float("nan")),
    ],
)
def test_bad_rtt_samples_are_rejected(prefix: str, rtt_ms: float) -> None:
    with pytest.raises(RttSampleError):
        RttTable().observe(prefix, 1, rtt_ms)


def test_client_prefix() -> None:
    assert client_prefix("198.51.100.9") == "198.51.100.0/24"
    assert client_prefix("2001:db8:aa:bb::1") == "2001:db8:aa::/48"


def test_measured_rtt_ages_out_and_is_learned_again() -> None:
    """A bad route steers the prefix away; once the measurement is older than max_age_s the
    distance estimate applies again, and the next report replaces it (no averaging with
    the stale value), so a fixed route is learned at once."""
    clock = [NOW]
    rtt = RttTable(alpha=0.2, max_age_s=60.0, clock=lambda: clock[0])
    rtt.observe("10.7.0.0/24", 1, 300.0)
    clock[0] += 59.0
    assert rtt.lookup("10.7.0.9") == {1: 300.0}
    assert select_route(world(), FRANKFURT, NOW, rtt.lookup("10.7.0.9")).cluster.cluster_id == 2
    clock[0] += 2.0
    assert rtt.lookup("10.7.0.9") == {}
    assert len(rtt) == 0
    rtt.observe("10.7.0.0/24", 1, 20.0)
    assert rtt.lookup("10.7.0.9") == {1: 20.0}
    clock[0] += 30.0
    rtt.observe("10.7.0.0/24", 1, 30.0)  # fresh: averaged (alpha 0.2)
    assert rtt.lookup("10.7.0.9")[1] == pytest.approx(22.0)


def test_rtt_max_age_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_age_s"):
        RttTable(max_age_s=0.0)


def test_a_prefix_not_measured_borrows_its_areas_rtts() -> None:
    """Lima's first network measured São Paulo at 170 ms (through Miami): a second Lima
    network, never measured, takes that from the area; its own measurement wins."""
    now = [0.0]
    rtt = RttTable(max_age_s=10.0, clock=lambda: now[0])
    lima = area_key(-12.05, -77.04, 0.5)
    assert lima == area_key(-12.2, -77.3, 0.5)  # one cell
    assert lima != area_key(-12.6, -77.04, 0.5)
    assert area_key(-12.05, -77.04, 0.0) == ""  # off
    rtt.observe("10.100.37.0/24", 5, 170.0, area=lima)
    rtt.observe("10.100.37.0/24", 2, 83.0, area=lima)
    assert rtt.lookup("10.100.79.2") == {}
    assert rtt.lookup_area(lima) == {5: 170.0, 2: 83.0}
    assert rtt.lookup_area("") == {}
    rtt.observe("10.100.79.0/24", 2, 90.0, area=lima)
    assert rtt.lookup("10.100.79.2") == {2: 90.0}
    assert rtt.lookup_area(lima)[2] == pytest.approx(83.0 + 0.2 * 7.0)
    now[0] = 11.0  # nobody reported for longer than max_age_s: the area forgets too
    assert rtt.lookup_area(lima) == {}
