"""Pure route selection: the nearest healthy cluster with capacity, and its best nodes.

No I/O, no clock: callers pass `now` (monotonic seconds) and every node carries the
monotonic deadline by which it must heartbeat again. Table tests drive it directly.

RTT model (when no measurement exists for the client's prefix):

    rtt_ms = RTT_BASE_MS + 2 * distance_km * PATH_INFLATION / FIBER_KM_PER_MS

Light in fibre covers about 200 km per millisecond (refractive index ~1.47); real routes
are longer than the great circle and cross queues, which a factor of ~1.5 covers for
long-haul paths; a few milliseconds of constant stand for the access network and the
relay itself. Frankfurt to Sydney (16,500 km) gives ~250 ms, in line with what public
looking glasses report. The estimate only has to rank clusters, and measured first-hop
RTTs replace it as soon as transceivers report them (see services/geosteer/rtt.py).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from libs.config.settings import join_host_port

EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius
FIBER_KM_PER_MS = 200.0
PATH_INFLATION = 1.5
RTT_BASE_MS = 5.0


class NodeKind(enum.IntEnum):
    """Mirrors voiceedge.common.v1.NodeKind (same numbers)."""

    UNSPECIFIED = 0
    RELAY = 1
    TRANSCEIVER = 2
    SIGNALING = 3
    BRIDGE = 4


@dataclass(frozen=True, order=True)
class GeoPoint:
    """A WGS 84 position in degrees."""

    latitude: float
    longitude: float

    def is_valid(self) -> bool:
        return (
            math.isfinite(self.latitude)
            and math.isfinite(self.longitude)
            and -90.0 <= self.latitude <= 90.0
            and -180.0 <= self.longitude <= 180.0
        )


@dataclass(frozen=True, order=True)
class Endpoint:
    """An IP literal and a port (a relay VIP, a media address); `tcp`: a relay's ICE-TCP
    port rather than UDP."""

    ip: str
    port: int
    tcp: bool = False

    def __str__(self) -> str:
        return join_host_port(self.ip, self.port)


@dataclass(frozen=True)
class RelayVip:
    """A configured public relay endpoint; `location` None means the cluster's own."""

    endpoint: Endpoint
    location: GeoPoint | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster as configured in the topology file."""

    cluster_id: int
    name: str
    region: str
    location: GeoPoint
    relay_vips: tuple[RelayVip, ...] = ()
    # Cap on concurrent sessions over the whole cluster; 0 means only the transceivers'
    # own capacities limit it.
    capacity_sessions: int = 0


@dataclass(frozen=True)
class NodeState:
    """A registered node as the registry last heard it."""

    node_id: str
    kind: NodeKind
    cluster_id: int
    expires_at: float  # monotonic deadline of its lease (last heartbeat + TTL)
    transceiver_id: int = 0
    grpc_address: str = ""
    media_address: Endpoint | None = None
    public_endpoints: tuple[Endpoint, ...] = ()
    capacity_sessions: int = 0  # 0: unlimited / not applicable
    active_sessions: int = 0
    draining: bool = False
    version: str = ""
    cpu_load: float = 0.0
    last_heartbeat_unix: float = 0.0

    def is_live(self, now: float) -> bool:
        return now < self.expires_at

    @property
    def has_room(self) -> bool:
        return self.capacity_sessions == 0 or self.active_sessions < self.capacity_sessions

    @property
    def load(self) -> float:
        """active / capacity, 0.0 (idle or unlimited) to 1.0 (full)."""
        if self.capacity_sessions == 0:
            return 0.0
        return min(1.0, self.active_sessions / self.capacity_sessions)

    def is_available(self, now: float) -> bool:
        """May take a new session: live, not draining, with room."""
        return self.is_live(now) and not self.draining and self.has_room


@dataclass(frozen=True)
class ClusterState:
    """A configured cluster with the nodes registered in it."""

    config: ClusterConfig
    nodes: tuple[NodeState, ...] = ()

    @property
    def cluster_id(self) -> int:
        return self.config.cluster_id

    def live_nodes(self, now: float) -> list[NodeState]:
        return sorted((n for n in self.nodes if n.is_live(now)), key=lambda n: n.node_id)

    def transceivers(self, now: float) -> list[NodeState]:
        return [n for n in self.live_nodes(now) if n.kind is NodeKind.TRANSCEIVER]

    def relay_vips(self, now: float) -> list[RelayVip]:
        """Configured VIPs, then those announced by live, non-draining relays (deduplicated)."""
        vips = list(self.config.relay_vips)
        seen = {v.endpoint for v in vips}
        for node in self.live_nodes(now):
            if node.kind is NodeKind.RELAY and not node.draining:
                for endpoint in node.public_endpoints:
                    if endpoint not in seen:
                        seen.add(endpoint)
                        vips.append(RelayVip(endpoint))
        return vips

    def capacity_sessions(self, now: float) -> int:
        """Sum of capacity over live, non-draining transceivers (the proto's definition)."""
        return sum(t.capacity_sessions for t in self.transceivers(now) if not t.draining)

    def active_sessions(self, now: float) -> int:
        return sum(t.active_sessions for t in self.transceivers(now))

    def is_healthy(self, now: float) -> bool:
        """At least one relay endpoint and one live, non-draining transceiver."""
        return bool(self.relay_vips(now)) and any(not t.draining for t in self.transceivers(now))

    def available_transceivers(self, now: float) -> list[NodeState]:
        """Transceivers that can take a session, least loaded first; empty when the
        cluster is unhealthy or at its configured cap."""
        if not self.relay_vips(now):
            return []
        cap = self.config.capacity_sessions
        if cap and self.active_sessions(now) >= cap:
            return []
        ready = [t for t in self.transceivers(now) if t.is_available(now)]
        return sorted(ready, key=lambda t: (t.load, t.cpu_load, t.active_sessions, t.node_id))


@dataclass(frozen=True)
class RouteHints:
    preferred_region: str = ""
    preferred_cluster_id: int | None = None
    excluded_cluster_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SwitchMargin:
    """How much better a cluster's distance estimate must be than a cluster measured for
    the client before it is tried instead: by `share` of the estimate and `slack_ms`,
    whichever is more. A measured RTT carries the relay hop and a little queueing that a
    distance estimate does not, so without a margin a client whose measured cluster is as
    good as an unmeasured one flips between them call after call; a bad route (measured
    far above every estimate) is still left at once."""

    share: float = 0.10
    slack_ms: float = 5.0

    def penalty_ms(self, estimate_ms: float) -> float:
        return max(self.slack_ms, self.share * estimate_ms)


class RttSource(enum.Enum):
    MEASURED = "measured"
    GEO = "geo"
    NONE = "none"


@dataclass(frozen=True)
class RouteDecision:
    cluster: ClusterState
    relay_endpoints: tuple[Endpoint, ...]
    transceivers: tuple[NodeState, ...]
    estimated_rtt_ms: float | None
    rtt_source: RttSource
    # Other usable clusters, best first (for logs and for the caller's own retries).
    alternatives: tuple[int, ...] = field(default=())


class NoRouteError(Exception):
    """No healthy cluster with capacity remains after the hints are applied."""


def haversine_km(a: GeoPoint, b: GeoPoint) -> float:
    """Great-circle distance on a spherical Earth."""
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlat = lat2 - lat1
    dlon = math.radians(b.longitude - a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def estimate_rtt_ms(a: GeoPoint, b: GeoPoint) -> float:
    """Round-trip estimate from distance; see the module docstring for the model."""
    return RTT_BASE_MS + 2 * haversine_km(a, b) * PATH_INFLATION / FIBER_KM_PER_MS


def _cluster_rtt(
    cluster: ClusterState, client: GeoPoint | None, measured: Mapping[int, float]
) -> tuple[float | None, RttSource]:
    if cluster.cluster_id in measured:
        return measured[cluster.cluster_id], RttSource.MEASURED
    if client is not None:
        return estimate_rtt_ms(client, cluster.config.location), RttSource.GEO
    return None, RttSource.NONE


def _vip_rtt(
    vip: RelayVip, cluster: ClusterState, client: GeoPoint, measured: Mapping[int, float]
) -> float:
    """The client's RTT to one VIP: what it measured to the VIP's cluster for a VIP at the
    cluster, else the distance estimate to where the VIP is."""
    if vip.location is None and cluster.cluster_id in measured:
        return measured[cluster.cluster_id]
    return estimate_rtt_ms(client, vip.location or cluster.config.location)


def _served_vips(cluster: ClusterState, now: float) -> list[RelayVip]:
    """Another cluster's VIPs, only while one of its relays is live and not draining (its
    configured VIPs alone say nothing about a relay being there)."""
    serving = any(n.kind is NodeKind.RELAY and not n.draining for n in cluster.live_nodes(now))
    return cluster.relay_vips(now) if serving else []


def _nearest_vips(
    chosen: ClusterState,
    clusters: Sequence[ClusterState],
    client: GeoPoint | None,
    measured: Mapping[int, float],
    now: float,
    margin: SwitchMargin,
) -> tuple[Endpoint, ...]:
    """The relay VIPs for the answer, nearest first. A relay forwards to every cluster's
    transceivers, so media may enter at another cluster's relay (a relay-only PoP) when
    that first hop is shorter (RTT as for clusters: measured for the client's prefix when
    known, else estimated).

    When another cluster's VIP is nearer than every one of the chosen cluster's own by
    more than `margin`, the answer lists only the VIPs within `margin` of the nearest: the
    caller's ICE takes the pair whose check, end to end through the relay to the
    transceiver, answers first, and through a PoP off the way to the transceiver that is
    longer than the direct path to the transceiver's own relay (Perth: the Sydney PoP is
    the short first hop, Singapore's relay the short way to Singapore), so with both in
    the answer media would not enter at the nearest relay. Otherwise the nearer VIPs come
    first and then the chosen cluster's own, as fallbacks."""
    own = chosen.relay_vips(now)
    if client is None:
        return tuple(v.endpoint for v in own)
    # sorted() is stable: equally near VIPs keep configuration order.
    ranked = sorted(own, key=lambda v: _vip_rtt(v, chosen, client, measured))
    if not ranked:
        return ()
    own_best = _vip_rtt(ranked[0], chosen, client, measured)
    nearer: list[tuple[float, RelayVip]] = []
    for cluster in clusters:
        if cluster.cluster_id == chosen.cluster_id:
            continue
        for vip in _served_vips(cluster, now):
            rtt = _vip_rtt(vip, cluster, client, measured)
            if rtt < own_best:
                nearer.append((rtt, vip))
    nearer.sort(key=lambda entry: entry[0])
    candidates = [v for _, v in nearer]
    if nearer and own_best - nearer[0][0] > margin.penalty_ms(nearer[0][0]):
        limit = nearer[0][0] + margin.penalty_ms(nearer[0][0])
        candidates = [v for rtt, v in nearer if rtt <= limit]
    else:
        candidates += ranked
    endpoints: list[Endpoint] = []
    for vip in candidates:
        if vip.endpoint not in endpoints:
            endpoints.append(vip.endpoint)
    return tuple(endpoints)


def select_route(
    clusters: Iterable[ClusterState],
    client: GeoPoint | None,
    now: float,
    rtt_overrides: Mapping[int, float] | None = None,
    hints: RouteHints | None = None,
    margin: SwitchMargin = SwitchMargin(),
) -> RouteDecision:
    """Picks the cluster for a new session.

    Order: the preferred cluster, then clusters of the preferred region, then lowest RTT
    (measured for the client's prefix when known, else estimated from distance; while the
    prefix has any measurement, an estimate ranks `margin` worse, see SwitchMargin), then
    lowest load, then cluster id. Clusters that are excluded, unhealthy, draining or full
    are skipped, which is how sessions spill to the next nearest cluster. The relay
    endpoints are the nearest VIPs, another cluster's first when it is nearer, and only
    those when it is nearer by `margin` (see `_nearest_vips`).
    Raises NoRouteError when nothing is left.
    """
    hints = hints or RouteHints()
    measured = rtt_overrides or {}
    clusters = list(clusters)
    ranked: list[tuple[tuple[bool, bool, float, float, int], ClusterState, float | None, RttSource]]
    ranked = []
    for cluster in clusters:
        if cluster.cluster_id in hints.excluded_cluster_ids:
            continue
        ready = cluster.available_transceivers(now)
        if not ready:
            continue
        rtt, source = _cluster_rtt(cluster, client, measured)
        capacity = sum(t.capacity_sessions for t in ready)
        load = cluster.active_sessions(now) / capacity if capacity else 0.0
        rank_ms = math.inf if rtt is None else rtt
        if source is RttSource.GEO and measured and rtt is not None:
            rank_ms += margin.penalty_ms(rtt)
        key = (
            cluster.cluster_id != hints.preferred_cluster_id,
            not hints.preferred_region or cluster.config.region != hints.preferred_region,
            rank_ms,
            load,
            cluster.cluster_id,
        )
        ranked.append((key, cluster, rtt, source))
    if not ranked:
        raise NoRouteError(_no_route_message(hints))
    ranked.sort(key=lambda entry: entry[0])
    _, best, rtt, source = ranked[0]
    return RouteDecision(
        cluster=best,
        relay_endpoints=_nearest_vips(best, clusters, client, measured, now, margin),
        transceivers=tuple(best.available_transceivers(now)),
        estimated_rtt_ms=rtt,
        rtt_source=source,
        alternatives=tuple(entry[1].cluster_id for entry in ranked[1:]),
    )


def _no_route_message(hints: RouteHints) -> str:
    message = "no healthy cluster with free capacity"
    if hints.excluded_cluster_ids:
        excluded = ",".join(str(c) for c in sorted(hints.excluded_cluster_ids))
        message += f" (excluded clusters: {excluded})"
    return message


def sorted_clusters(clusters: Sequence[ClusterState]) -> list[ClusterState]:
    return sorted(clusters, key=lambda c: c.cluster_id)
