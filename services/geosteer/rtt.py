"""Measured first-hop RTTs per (client prefix, cluster), folded into routing.

Transceivers report RttSample(client_prefix, rtt_ms, sample_count) in their heartbeats.
We keep an exponentially weighted moving average per client /24 (IPv4) or /48 (IPv6)
and cluster; RouteSession uses it instead of the distance estimate for that cluster.
The table is bounded: the least recently updated prefixes are evicted first.

Measurements age out: one older than `max_age_s` is no longer used, and the next report
for it starts afresh instead of being averaged with it. Without that, a prefix steered
away from a cluster by a bad route would never go back once the route is fixed (nobody
of that prefix measures the cluster any more); after `max_age_s` the distance estimate
sends it there again and the new RTT is learned.

Areas: a prefix never measured borrows what other prefixes in its area measured. An area
is the cell of a grid of `area_deg` degrees that the prefix's GeoIP location falls in (a
metro's networks mostly share its routes: Lima's to São Paulo run through Miami whichever
ISP the caller is on), so the first caller of a metro pays for a bad route and its
neighbours on other /24s do not. The client's own measurement for a cluster always wins
over the area's; area entries age out like the others.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

IPV4_PREFIX_LEN = 24
IPV6_PREFIX_LEN = 48
MAX_RTT_MS = 60_000.0


class RttSampleError(ValueError):
    """A sample with a malformed prefix or an impossible RTT."""


def client_prefix(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The prefix a client address is aggregated under: a.b.c.0/24 or x:x:x::/48."""
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    length = IPV4_PREFIX_LEN if address.version == 4 else IPV6_PREFIX_LEN
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False))


def normalize_prefix(text: str) -> str:
    """The aggregation prefix of a reported CIDR; longer prefixes (a /32) fold into their
    /24, shorter ones (a /16) are too coarse to steer by and are rejected."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise RttSampleError(f"client_prefix {text!r}: {exc}") from None
    length = IPV4_PREFIX_LEN if network.version == 4 else IPV6_PREFIX_LEN
    if network.prefixlen < length:
        raise RttSampleError(f"client_prefix {text!r}: shorter than /{length}")
    return client_prefix(network.network_address)


def area_key(latitude: float, longitude: float, area_deg: float) -> str:
    """The grid cell of a location ("" with area_deg 0: areas off)."""
    if area_deg <= 0:
        return ""
    return f"{math.floor(latitude / area_deg)}:{math.floor(longitude / area_deg)}"


@dataclass(frozen=True)
class Measured:
    rtt_ms: float
    updated_at: float  # the table's clock (monotonic seconds) at the last report


class RttTable:
    """EWMA of measured RTT per (client prefix, cluster id), LRU-bounded by prefix count,
    each entry forgotten `max_age_s` after its last report (see the module docstring).

    `alpha` is the weight of one measurement; a report averaging n measurements weighs
    1 - (1 - alpha)^n, as if they had arrived one by one with the same mean.
    """

    def __init__(
        self,
        max_prefixes: int = 100_000,
        alpha: float = 0.2,
        max_age_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_prefixes < 1:
            raise ValueError("max_prefixes must be >= 1")
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if not max_age_s > 0.0:
            raise ValueError("max_age_s must be > 0")
        self._max = max_prefixes
        self._alpha = alpha
        self._max_age_s = max_age_s
        self._clock = clock
        self._table: OrderedDict[str, dict[int, Measured]] = OrderedDict()
        self._areas: OrderedDict[str, dict[int, Measured]] = OrderedDict()  # same bound

    def __len__(self) -> int:
        return len(self._table)

    def observe(
        self,
        prefix: str,
        cluster_id: int,
        rtt_ms: float,
        sample_count: int = 1,
        area: str = "",
    ) -> None:
        """Folds one report in (into the prefix's entry and, given one, its area's);
        raises RttSampleError for bad input (caller counts a drop)."""
        if not math.isfinite(rtt_ms) or not 0.0 < rtt_ms <= MAX_RTT_MS:
            raise RttSampleError(f"rtt_ms {rtt_ms!r} out of range (0, {MAX_RTT_MS:g}]")
        key = normalize_prefix(prefix)
        now = self._clock()
        weight = 1.0 - (1.0 - self._alpha) ** max(1, sample_count)
        self._fold(self._table, key, cluster_id, rtt_ms, weight, now)
        if area:
            self._fold(self._areas, area, cluster_id, rtt_ms, weight, now)

    def _fold(
        self,
        table: OrderedDict[str, dict[int, Measured]],
        key: str,
        cluster_id: int,
        rtt_ms: float,
        weight: float,
        now: float,
    ) -> None:
        per_cluster = table.get(key)
        if per_cluster is None:
            per_cluster = {}
            table[key] = per_cluster
            while len(table) > self._max:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        previous = per_cluster.get(cluster_id)
        if previous is None or self._is_stale(previous, now):
            per_cluster[cluster_id] = Measured(rtt_ms, now)
        else:
            averaged = previous.rtt_ms + weight * (rtt_ms - previous.rtt_ms)
            per_cluster[cluster_id] = Measured(averaged, now)

    def _is_stale(self, entry: Measured, now: float) -> bool:
        return now - entry.updated_at > self._max_age_s

    def lookup(self, client_ip: str) -> dict[int, float]:
        """cluster id -> measured RTT for the client's prefix (empty when none); entries
        past `max_age_s` are dropped here."""
        try:
            key = client_prefix(client_ip)
        except ValueError:
            return {}
        return self._read(self._table, key)

    def lookup_area(self, area: str) -> dict[int, float]:
        """cluster id -> RTT measured by the area's prefixes (empty when none or area "")."""
        return self._read(self._areas, area) if area else {}

    def _read(self, table: OrderedDict[str, dict[int, Measured]], key: str) -> dict[int, float]:
        per_cluster = table.get(key)
        if per_cluster is None:
            return {}
        now = self._clock()
        for cluster_id in [c for c, e in per_cluster.items() if self._is_stale(e, now)]:
            del per_cluster[cluster_id]
        if not per_cluster:
            del table[key]
        return {cluster_id: entry.rtt_ms for cluster_id, entry in per_cluster.items()}
