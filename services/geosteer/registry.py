"""Live topology: configured clusters plus registered nodes with heartbeat leases.

`NodeStore` is the small storage interface (in memory here; a Redis implementation can
slot in through `make_node_store`); `Directory` holds the lease rules, the topology
revision and the change notifications that WatchTopology streams wait on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from libs.observability.telemetry import log_event
from libs.service.errors import StatusError, invalid_argument
from services.geosteer.rtt import RttSampleError, RttTable
from services.geosteer.selection import ClusterConfig, ClusterState, NodeKind, NodeState

logger = logging.getLogger("voiceedge.geosteer")

# Kinds whose records must name a configured cluster (they carry traffic for it).
CLUSTER_BOUND_KINDS = frozenset({NodeKind.RELAY, NodeKind.TRANSCEIVER})


class NodeStore(Protocol):
    """Where node records live. All methods are coroutines so a networked store fits."""

    async def put(self, node: NodeState) -> None: ...

    async def get(self, node_id: str) -> NodeState | None: ...

    async def delete(self, node_id: str) -> bool: ...

    async def all(self) -> list[NodeState]: ...


class InMemoryNodeStore:
    """The single-process store (dev, tests, one geosteer replica)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeState] = {}

    async def put(self, node: NodeState) -> None:
        self._nodes[node.node_id] = node

    async def get(self, node_id: str) -> NodeState | None:
        return self._nodes.get(node_id)

    async def delete(self, node_id: str) -> bool:
        return self._nodes.pop(node_id, None) is not None

    async def all(self) -> list[NodeState]:
        return list(self._nodes.values())


def make_node_store() -> NodeStore:
    """The one place that picks the store. Only the in-memory store exists so far (a shared
    Redis registry for several geosteer replicas is issue 16's; its setting comes with it)."""
    return InMemoryNodeStore()


@dataclass(frozen=True)
class HeartbeatUpdate:
    active_sessions: int
    capacity_sessions: int  # 0: unchanged
    draining: bool
    cpu_load: float


@dataclass(frozen=True)
class RttReport:
    client_prefix: str
    rtt_ms: float
    sample_count: int


@dataclass(frozen=True)
class Snapshot:
    clusters: tuple[ClusterState, ...]
    revision: int
    now: float


class Directory:
    """Clusters, node leases, revision and change notification. Single event loop."""

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

    def now(self) -> float:
        return self._clock()

    def _bump(self, reason: str, node_id: str) -> None:
        self.revision += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        log_event(
            logger,
            "topology.changed",
            level=logging.DEBUG,
            reason=reason,
            node__id=node_id,
            topology__revision=self.revision,
        )

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
        now = self.now()
        await self.sweep()
        if node.kind is NodeKind.TRANSCEIVER:
            for other in await self.store.all():
                if (
                    other.node_id != node.node_id
                    and other.kind is NodeKind.TRANSCEIVER
                    and other.cluster_id == node.cluster_id
                    and other.transceiver_id == node.transceiver_id
                    and other.is_live(now)
                ):
                    raise StatusError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        "transceiver_id_taken",
                        f"transceiver_id {node.transceiver_id} of cluster {node.cluster_id} "
                        f"is held by live node {other.node_id}",
                    )
        stored = dataclasses.replace(
            node, expires_at=now + self.heartbeat_ttl_s, last_heartbeat_unix=self._wall()
        )
        await self.store.put(stored)
        log_event(
            logger,
            "node.registered",
            node__id=node.node_id,
            node__kind=node.kind.name.lower(),
            cluster__id=node.cluster_id,
        )
        self._bump("register", node.node_id)
        return stored

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
        for sample in samples:
            try:
                self.rtt.observe(
                    sample.client_prefix, node.cluster_id, sample.rtt_ms, sample.sample_count
                )
            except RttSampleError as exc:
                self.rtt_samples_dropped += 1
                log_event(
                    logger, "rtt_sample.dropped", level=logging.DEBUG, node__id=node_id, error=exc
                )
        if (
            renewed.draining != node.draining
            or renewed.capacity_sessions != node.capacity_sessions
            or renewed.has_room != node.has_room
        ):
            self._bump("heartbeat", node_id)
        return True

    async def deregister(self, node_id: str) -> bool:
        removed = await self.store.delete(node_id)
        if removed:
            log_event(logger, "node.deregistered", node__id=node_id)
            self._bump("deregister", node_id)
        return removed

    async def _expire(self, node: NodeState) -> None:
        if await self.store.delete(node.node_id):
            log_event(
                logger,
                "node.expired",
                level=logging.WARNING,
                node__id=node.node_id,
                cluster__id=node.cluster_id,
            )
            self._bump("expired", node.node_id)

    async def sweep(self) -> int:
        """Drops nodes whose lease ran out; returns how many."""
        now = self.now()
        expired = [n for n in await self.store.all() if not n.is_live(now)]
        for node in expired:
            await self._expire(node)
        return len(expired)

    async def snapshot(self) -> Snapshot:
        await self.sweep()
        now = self.now()
        by_cluster: dict[int, list[NodeState]] = {cid: [] for cid in self.clusters}
        for node in await self.store.all():
            if node.cluster_id in by_cluster:
                by_cluster[node.cluster_id].append(node)
        clusters = tuple(
            ClusterState(config, tuple(sorted(by_cluster[cid], key=lambda n: n.node_id)))
            for cid, config in self.clusters.items()
        )
        return Snapshot(clusters, self.revision, now)

    async def run_sweeper(self) -> None:
        """Periodic sweep so watchers learn of dead nodes without any reader; cancel to stop."""
        interval = max(0.05, min(self.heartbeat_interval_s, self.heartbeat_ttl_s / 2))
        while True:
            await asyncio.sleep(interval)
            await self.sweep()
