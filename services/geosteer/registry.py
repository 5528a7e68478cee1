"""Live topology: configured clusters plus registered nodes with heartbeat leases.

`Directory` holds the lease rules, the topology revision and the change notifications that
WatchTopology streams wait on; the records live in a `NodeStore` (services/geosteer/store.py:
this process's memory, or a Redis that several replicas share, whose changes `follow`
brings in).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from libs.observability.telemetry import log_event
from libs.service.errors import StatusError, invalid_argument
from services.geosteer.rtt import RttSampleError, RttTable
from services.geosteer.selection import ClusterConfig, ClusterState, NodeKind, NodeState
from services.geosteer.store import NodeStore, RttReport, StoreEvent

logger = logging.getLogger("voiceedge.geosteer")

# Kinds whose records must name a configured cluster (they carry traffic for it).
CLUSTER_BOUND_KINDS = frozenset({NodeKind.RELAY, NodeKind.TRANSCEIVER})


@dataclass(frozen=True)
class HeartbeatUpdate:
    active_sessions: int
    capacity_sessions: int  # 0: unchanged
    draining: bool
    cpu_load: float


@dataclass(frozen=True)
class Snapshot:
    clusters: tuple[ClusterState, ...]
    revision: int
    now: float


def sweep_interval_s(heartbeat_interval_s: float, heartbeat_ttl_s: float) -> float:
    """How often a replica sweeps out dead nodes (and, on Redis, re-reads the revision)."""
    return max(0.05, min(heartbeat_interval_s, heartbeat_ttl_s / 2))


class Directory:
    """Clusters, node leases, revision and change notification. Single event loop.

    With a shared store, other replicas' changes arrive through `run_follower`: their
    revisions wake this replica's WatchTopology streams, their RTT reports go into this
    replica's table."""

    def __init__(
        self,
        clusters: Sequence[ClusterConfig],
        store: NodeStore,
        rtt: RttTable,
        *,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        area_of: Callable[[str], str] = lambda prefix: "",
    ) -> None:
        self.clusters = {c.cluster_id: c for c in sorted(clusters, key=lambda c: c.cluster_id)}
        self.store = store
        self.rtt = rtt
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._clock = clock
        self._wall = wall_clock
        self.revision = 1
        self._changed = asyncio.Event()
        self.rtt_samples_dropped = 0
        # A reported prefix's area (rtt.area_key of its GeoIP location; "" for none).
        self.area_of = area_of

    def now(self) -> float:
        return self._clock()

    def _advance(self, revision: int) -> None:
        """Wakes the watchers when `revision` is news to this replica."""
        if revision <= self.revision:
            return
        self.revision = revision
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _bump(self, reason: str, node_id: str) -> None:
        self._advance(await self.store.changed())
        log_event(
            logger,
            "topology.changed",
            level=logging.DEBUG,
            reason=reason,
            node__id=node_id,
            topology__revision=self.revision,
        )

    def on_store_event(self, event: StoreEvent) -> None:
        """Another replica's change (NodeStore.follow)."""
        self._observe(event.cluster_id, event.samples, "")
        if event.revision:
            self._advance(event.revision)

    async def wait_changed(self, after_revision: int) -> int:
        """Returns once the revision is above `after_revision` (at once if it already is)."""
        while self.revision <= after_revision:
            await self._changed.wait()
        return self.revision

    async def register(self, node: NodeState) -> NodeState:
        """Adds or replaces `node` (its expires_at and last_heartbeat are set here)."""
        if node.kind in CLUSTER_BOUND_KINDS and node.cluster_id not in self.clusters:
            raise invalid_argument(
                "unknown_cluster", f"node {node.node_id}: unknown cluster_id {node.cluster_id}"
            )
        await self._live_nodes()  # drops and announces leases that ran out, as every read does
        now = self.now()
        stored = dataclasses.replace(
            node, expires_at=now + self.heartbeat_ttl_s, last_heartbeat_unix=self._wall()
        )
        # The claim check and the write are one step in the store: two replicas
        # registering one transceiver id at once cannot both win.
        holder = await self.store.register(stored, now)
        if holder:
            raise StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                "transceiver_id_taken",
                f"transceiver_id {node.transceiver_id} of cluster {node.cluster_id} "
                f"is held by live node {holder}",
            )
        log_event(
            logger,
            "node.registered",
            node__id=node.node_id,
            node__kind=node.kind.name.lower(),
            cluster__id=node.cluster_id,
        )
        await self._bump("register", node.node_id)
        return stored

    def _observe(
        self, cluster_id: int, samples: Sequence[RttReport], node_id: str
    ) -> list[RttReport]:
        """Folds RTT reports into the table; returns those taken (bad ones are counted)."""
        taken = []
        for sample in samples:
            try:
                self.rtt.observe(
                    sample.client_prefix,
                    cluster_id,
                    sample.rtt_ms,
                    sample.sample_count,
                    self.area_of(sample.client_prefix),
                )
            except RttSampleError as exc:
                self.rtt_samples_dropped += 1
                log_event(
                    logger, "rtt_sample.dropped", level=logging.DEBUG, node__id=node_id, error=exc
                )
            else:
                taken.append(sample)
        return taken

    async def heartbeat(
        self, node_id: str, update: HeartbeatUpdate, samples: Sequence[RttReport] = ()
    ) -> bool:
        """Renews the lease; False when the node is unknown or its lease already ran out."""
        now = self.now()
        node = await self.store.get(node_id)
        if node is None or not node.is_live(now):
            if node is not None:
                await self._expire(node)
            return False
        renewed = dataclasses.replace(
            node,
            active_sessions=update.active_sessions,
            capacity_sessions=update.capacity_sessions or node.capacity_sessions,
            draining=update.draining,
            cpu_load=update.cpu_load,
            expires_at=now + self.heartbeat_ttl_s,
            last_heartbeat_unix=self._wall(),
        )
        await self.store.put(renewed)
        await self.store.share_rtt(
            node.cluster_id, self._observe(node.cluster_id, samples, node_id)
        )
        if (
            renewed.draining != node.draining
            or renewed.capacity_sessions != node.capacity_sessions
            or renewed.has_room != node.has_room
        ):
            await self._bump("heartbeat", node_id)
        return True

    async def deregister(self, node_id: str) -> bool:
        removed = await self.store.delete(node_id)
        if removed:
            log_event(logger, "node.deregistered", node__id=node_id)
            await self._bump("deregister", node_id)
        return removed

    async def _expire(self, node: NodeState) -> bool:
        """Drops `node` if its lease still ran out in the store (another replica may have
        renewed or dropped it meanwhile); True if this call dropped it."""
        if not await self.store.delete_expired(node.node_id, self.now()):
            return False
        log_event(
            logger,
            "node.expired",
            level=logging.WARNING,
            node__id=node.node_id,
            cluster__id=node.cluster_id,
        )
        await self._bump("expired", node.node_id)
        return True

    async def _live_nodes(self) -> list[NodeState]:
        """Every live record, after dropping those whose lease ran out (one store read)."""
        now = self.now()
        live = []
        for node in await self.store.all():
            if node.is_live(now):
                live.append(node)
            else:
                await self._expire(node)
        return live

    async def sweep(self) -> int:
        """Drops nodes whose lease ran out; returns how many this call dropped."""
        now = self.now()
        expired = [n for n in await self.store.all() if not n.is_live(now)]
        return sum([await self._expire(node) for node in expired])

    async def snapshot(self) -> Snapshot:
        live = await self._live_nodes()
        now = self.now()
        by_cluster: dict[int, list[NodeState]] = {cid: [] for cid in self.clusters}
        for node in live:
            if node.cluster_id in by_cluster:
                by_cluster[node.cluster_id].append(node)
        clusters = tuple(
            ClusterState(config, tuple(sorted(by_cluster[cid], key=lambda n: n.node_id)))
            for cid, config in self.clusters.items()
        )
        return Snapshot(clusters, self.revision, now)

    async def run_sweeper(self, on_reachable: Callable[[bool], None] | None = None) -> None:
        """Periodic sweep so watchers learn of dead nodes without any reader; cancel to
        stop. A store that cannot be reached is retried at the next turn; `on_reachable`
        hears after every sweep whether the store answered (what health reports)."""
        while True:
            await asyncio.sleep(sweep_interval_s(self.heartbeat_interval_s, self.heartbeat_ttl_s))
            try:
                await self.sweep()
            except StatusError as exc:
                log_event(logger, "registry.sweep_failed", level=logging.WARNING, error=exc)
                if on_reachable is not None:
                    on_reachable(False)
            else:
                if on_reachable is not None:
                    on_reachable(True)

    async def run_follower(self) -> None:
        """Takes in other replicas' changes until cancelled (at once done for a store of
        this process only)."""
        await self.store.follow(self.on_store_event)
