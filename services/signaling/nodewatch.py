"""Transceivers leaving geosteer's topology, so their calls end in the API at once.

Geosteer drops a transceiver that misses heartbeats (heartbeat_ttl_ms) or deregisters after
its drain. `NodeWatch` follows `WatchTopology` and hands each transceiver that was in one
snapshot and is missing from the next to `on_lost` (CallService.end_calls_on). The first
snapshot of every stream is only a baseline: after a geosteer restart the topology starts
empty and fills as nodes register again, and that must not end anyone's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc.aio

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2

logger = logging.getLogger("voiceedge.signaling.nodewatch")


def transceivers(topology: geosteer_pb2.Topology) -> frozenset[str]:
    """The node ids of every transceiver in `topology`."""
    return frozenset(
        node.node_id
        for cluster in topology.clusters
        for node in cluster.nodes
        if node.kind == common_pb2.NODE_KIND_TRANSCEIVER
    )


def lost(before: frozenset[str] | None, now: frozenset[str]) -> list[str]:
    """Transceivers in `before` and not in `now` (none when there is no `before`)."""
    return sorted(before - now) if before is not None else []


class NodeWatch:
    """Follows geosteer's WatchTopology (reopened `retry_s` after it breaks) and awaits
    `on_lost(node_id)` for each transceiver that leaves it."""

    def __init__(self, stub: Any, on_lost: Callable[[str], Awaitable[int]], retry_s: float) -> None:
        self._stub = stub
        self._on_lost = on_lost
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self.snapshots = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except grpc.aio.AioRpcError as exc:
                log_event(
                    logger,
                    "nodewatch.broken",
                    level=logging.WARNING,
                    rpc__grpc__status_code=exc.code().name,
                )
            await asyncio.sleep(self._retry_s)

    async def _follow(self) -> None:
        known: frozenset[str] | None = None
        call = self._stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
        try:
            async for message in call:
                now = transceivers(message.topology)
                self.snapshots += 1
                for node_id in lost(known, now):
                    await self._on_lost(node_id)
                known = now
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                call.cancel()
