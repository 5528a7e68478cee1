"""A world on the testbed (pure): regions, client cities, the RTTs between them, and the
layout, topology file and GeoIP records that put it on network namespaces.

    c<i> 10.100.<i>.2 --(mesh link)-- world --(mesh link)-- r<id> 10.200.<id>.10 (relay VIP)
                                        |                     | 10.210.<id>.0/24
                                        |                   t<id> (transceiver)
                                       ctl 10.250.0.2 (geosteer, signaling, bridge)

Every client has its own /24 (geosteer learns RTTs per /24); a city may have several
client networks (`make_world(networks=)`), other ISPs' /24s at the same place that share
the city's routes, bad ones included (geosteer shares RTTs within an area). Delays come
from great-circle distance with a fibre factor: light covers ~200 km/ms in fibre, real
paths are longer than the great circle by a factor drawn per (city, region) pair from
1.35 to 1.75 (a deterministic hash, so every run is the same world), plus `ACCESS_MS` for the access
network. Geosteer's own model (services/geosteer/selection.py) uses a flat 1.5 and 5 ms,
so its first guess is near but not exact, as with a real GeoIP database. `BAD_ROUTES`
are pairs whose real RTT is far above what distance says (peering detours documented in
public looking glasses: Johannesburg to São Paulo through Europe, Lima to São Paulo
through Miami): their nearest region by distance is not their fastest.

Between regions the path is the operator's own backbone, straighter than the public
internet: a flat `BACKBONE_FACTOR` of 1.2. So entering at the nearest relay and crossing
the backbone beats a long public path to a far cluster's relay, which is why a relay
forwards to any cluster's transceiver.

A client's link carries, per far-end region, half that pair's RTT each way (the mesh
forwarder picks the delay by the far end's address, tools/netsim/mesh.py); a region's link
carries a quarter of each inter-region RTT each way (a frame between two regions crosses
both). The control host's link has no delay: the control plane sits in one place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.geosteer.selection import GeoPoint, estimate_rtt_ms, haversine_km

FIBER_KM_PER_MS = 200.0
ACCESS_MS = 2.0
FACTOR_MIN = 1.35
FACTOR_SPAN = 0.40
BACKBONE_FACTOR = 1.2
RELAY_PORT = 3478
CONTROL = "10.250.0.2"
CONTROL_GATEWAY = "10.250.0.1"


@dataclass(frozen=True)
class Region:
    """One cluster (relay + transceiver hosts), or a relay-only point of presence."""

    cluster_id: int
    name: str
    location: GeoPoint
    transceivers: bool = True

    @property
    def relay_host(self) -> str:
        return f"r{self.cluster_id}"

    @property
    def transceiver_host(self) -> str:
        return f"t{self.cluster_id}"

    @property
    def vip(self) -> str:
        return f"10.200.{self.cluster_id}.10"

    @property
    def gateway(self) -> str:
        return f"10.200.{self.cluster_id}.1"

    @property
    def relay_internal(self) -> str:
        return f"10.210.{self.cluster_id}.1"

    @property
    def transceiver_address(self) -> str:
        return f"10.210.{self.cluster_id}.2"

    @property
    def prefixes(self) -> tuple[str, ...]:
        """What lies behind this region's link (the VIP's net and the internal one)."""
        return (f"10.200.{self.cluster_id}.0/24", f"10.210.{self.cluster_id}.0/24")


@dataclass(frozen=True)
class City:
    name: str
    location: GeoPoint


@dataclass(frozen=True)
class Client:
    index: int
    city: City
    isp: int = 1  # the city's first, second, ... client network (another ISP's /24)

    @property
    def name(self) -> str:
        return self.city.name if self.isp == 1 else f"{self.city.name}-{self.isp}"

    @property
    def host(self) -> str:
        return f"c{self.index}"

    @property
    def address(self) -> str:
        return f"10.100.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"10.100.{self.index}.1"

    @property
    def network(self) -> str:
        return f"10.100.{self.index}.0/24"


REGIONS = (
    Region(1, "fra", GeoPoint(50.11, 8.68)),
    Region(2, "iad", GeoPoint(39.04, -77.49)),
    Region(3, "sjc", GeoPoint(37.34, -121.89)),
    Region(4, "sin", GeoPoint(1.35, 103.82)),
    Region(5, "gru", GeoPoint(-23.55, -46.63)),
    Region(6, "syd", GeoPoint(-33.87, 151.21), transceivers=False),  # a relay PoP
)

CITIES = tuple(
    City(name, GeoPoint(lat, lon))
    for name, lat, lon in (
        ("london", 51.51, -0.13),
        ("paris", 48.86, 2.35),
        ("madrid", 40.42, -3.70),
        ("stockholm", 59.33, 18.07),
        ("warsaw", 52.23, 21.01),
        ("rome", 41.90, 12.50),
        ("istanbul", 41.01, 28.98),
        ("moscow", 55.76, 37.62),
        ("cairo", 30.04, 31.24),
        ("lagos", 6.52, 3.38),
        ("nairobi", -1.29, 36.82),
        ("johannesburg", -26.20, 28.05),
        ("dubai", 25.20, 55.27),
        ("mumbai", 19.08, 72.88),
        ("delhi", 28.61, 77.21),
        ("bangkok", 13.76, 100.50),
        ("jakarta", -6.21, 106.85),
        ("hongkong", 22.32, 114.17),
        ("tokyo", 35.68, 139.69),
        ("seoul", 37.57, 126.98),
        ("manila", 14.60, 120.98),
        ("sydney", -33.87, 151.21),
        ("melbourne", -37.81, 144.96),
        ("auckland", -36.85, 174.76),
        ("perth", -31.95, 115.86),
        ("seattle", 47.61, -122.33),
        ("losangeles", 34.05, -118.24),
        ("denver", 39.74, -104.99),
        ("chicago", 41.88, -87.63),
        ("dallas", 32.78, -96.80),
        ("toronto", 43.65, -79.38),
        ("newyork", 40.71, -74.01),
        ("miami", 25.76, -80.19),
        ("mexico", 19.43, -99.13),
        ("honolulu", 21.31, -157.86),
        ("anchorage", 61.22, -149.90),
        ("bogota", 4.71, -74.07),
        ("lima", -12.05, -77.04),
        ("santiago", -33.45, -70.67),
        ("buenosaires", -34.60, -58.38),
        ("rio", -22.91, -43.17),
        ("montevideo", -34.90, -56.16),
    )
)

# (city, region) -> RTT in ms where the route is far longer than the distance.
BAD_ROUTES = {
    ("johannesburg", "gru"): 340.0,
    ("lima", "gru"): 170.0,
}


@dataclass(frozen=True)
class World:
    regions: tuple[Region, ...]
    clients: tuple[Client, ...]
    bad_routes: dict[tuple[str, str], float]

    def region(self, cluster_id: int) -> Region:
        for region in self.regions:
            if region.cluster_id == cluster_id:
                return region
        raise KeyError(cluster_id)

    def region_named(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def region_of_vip(self, ip: str) -> Region:
        for region in self.regions:
            if region.vip == ip:
                return region
        raise KeyError(ip)

    def rtt_ms(self, client: Client, region: Region) -> float:
        """The simulated client <-> relay VIP round trip (what the links add up to)."""
        bad = self.bad_routes.get((client.city.name, region.name))
        if bad is not None:
            return bad
        return path_rtt_ms(client.city.name, client.city.location, region.name, region.location)

    def inter_region_rtt_ms(self, a: Region, b: Region) -> float:
        """Over the backbone (see the module docstring)."""
        distance = haversine_km(a.location, b.location)
        return ACCESS_MS + 2 * distance * BACKBONE_FACTOR / FIBER_KM_PER_MS


def make_world(
    regions: tuple[Region, ...] = REGIONS,
    cities: tuple[City, ...] = CITIES,
    bad_routes: dict[tuple[str, str], float] | None = None,
    networks: int = 1,
) -> World:
    """`networks` client networks per city (each its own host and /24 at the same place,
    sharing the city's routes): every city's first network, then every city's second..."""
    pairs = [(isp, city) for isp in range(1, networks + 1) for city in cities]
    if len(pairs) > 250:
        raise ValueError(f"{len(pairs)} client networks: at most 250 (10.100.<i>.0/24)")
    clients = tuple(Client(i, city, isp) for i, (isp, city) in enumerate(pairs))
    return World(regions, clients, dict(BAD_ROUTES if bad_routes is None else bad_routes))


def _factor(a: str, b: str) -> float:
    digest = hashlib.sha256(f"{min(a, b)}|{max(a, b)}".encode()).digest()
    return FACTOR_MIN + FACTOR_SPAN * int.from_bytes(digest[:4], "big") / 2**32


def path_rtt_ms(a_name: str, a: GeoPoint, b_name: str, b: GeoPoint) -> float:
    return ACCESS_MS + 2 * haversine_km(a, b) * _factor(a_name, b_name) / FIBER_KM_PER_MS


def geo_guess(world: World, client: Client) -> Region:
    """The region whose VIP geosteer's distance model ranks first for a new client."""
    relays = list(world.regions)
    return min(relays, key=lambda r: estimate_rtt_ms(client.city.location, r.location))


def within(rtt_ms: float, best_ms: float, share: float = 0.10, slack_ms: float = 5.0) -> bool:
    """The target: within `share` of the best, or within `slack_ms` of it."""
    return rtt_ms <= best_ms * (1 + share) or rtt_ms - best_ms <= slack_ms


def layout_text(world: World) -> str:
    """The testbed layout (tools/netsim/layout.py language)."""
    lines = ["router world", "host ctl", f"link ctl {CONTROL}/24 world {CONTROL_GATEWAY}/24"]
    lines.append(f"route ctl default via {CONTROL_GATEWAY}")
    for region in world.regions:
        r = region.relay_host
        lines += [
            f"router {r}",
            f"link {r} {region.vip}/24 world {region.gateway}/24 impaired",
            f"route {r} default via {region.gateway}",
        ]
        if region.transceivers:
            t = region.transceiver_host
            lines += [
                f"host {t}",
                f"link {r} {region.relay_internal}/24 {t} {region.transceiver_address}/24",
                f"route {t} default via {region.relay_internal}",
                f"route world 10.210.{region.cluster_id}.0/24 via {region.vip}",
            ]
    for client in world.clients:
        lines += [
            f"host {client.host}",
            f"link {client.host} {client.address}/24 world {client.gateway}/24 impaired",
            f"route {client.host} default via {client.gateway}",
        ]
    return "\n".join(lines) + "\n"


def link_delays(world: World) -> list[dict[str, float]]:
    """Per impaired link, in layout order: far-end prefix -> one-way delay in ms."""
    delays: list[dict[str, float]] = []
    for region in world.regions:
        table: dict[str, float] = {}
        for other in world.regions:
            if other is not region:
                quarter = world.inter_region_rtt_ms(region, other) / 4
                table.update({prefix: quarter for prefix in other.prefixes})
        delays.append(table)
    for client in world.clients:
        table = {}
        for region in world.regions:
            half = world.rtt_ms(client, region) / 2
            table.update({prefix: half for prefix in region.prefixes})
        delays.append(table)
    return delays


def topology_toml(world: World) -> str:
    """Geosteer's clusters: no configured VIPs, so a cluster offers its relay's VIP only
    while that relay heartbeats (relays register it with public_advertise)."""
    out = []
    for region in world.regions:
        out.append(
            "[[clusters]]\n"
            f"id = {region.cluster_id}\n"
            f'name = "{region.name}-1"\n'
            f'region = "{region.name}"\n'
            f"latitude = {region.location.latitude}\n"
            f"longitude = {region.location.longitude}\n"
        )
    return "\n".join(out)
