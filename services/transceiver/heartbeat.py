"""Registration and heartbeats to geosteer: capacity, load and draining, so signaling only
picks transceivers that can take a session. Re-registers when geosteer forgets the node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from libs.observability.telemetry import log_event
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

logger = logging.getLogger("voiceedge.transceiver.heartbeat")

RETRY_S = 1.0
RPC_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Load:
    active_sessions: int
    draining: bool


class CpuMeter:
    """This process's CPU time over wall time since the previous reading, 0.0 to 1.0 of one
    core (a transceiver runs its sessions on one event loop)."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def read(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        used = (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._cpu, self._wall = cpu, wall
        return min(max(used, 0.0), 1.0)


class GeosteerReporter:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        node: geosteer_pb2.Node,
        load: Callable[[], Load],
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._on_stop = on_stop
        # grpc-stubs type the generated stub as synchronous; on an aio channel it is not.
        self._stub: Any = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        self._node = node
        self._load = load
        self._cpu = CpuMeter()
        self._task: asyncio.Task[None] | None = None
        self.interval_s = RETRY_S
        self.registrations = 0
        self.heartbeats = 0
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Report now (e.g. draining just started) instead of at the next interval."""
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _register(self) -> None:
        node = geosteer_pb2.Node()
        node.CopyFrom(self._node)
        load = self._load()
        node.active_sessions = load.active_sessions
        node.draining = load.draining
        response = await self._stub.RegisterNode(
            geosteer_pb2.RegisterNodeRequest(node=node), timeout=RPC_TIMEOUT_S
        )
        if response.heartbeat_interval_ms:
            self.interval_s = response.heartbeat_interval_ms / 1000.0
        self.registrations += 1
        log_event(logger, "geosteer.registered", node__id=node.node_id, interval_s=self.interval_s)

    async def _heartbeat(self) -> bool:
        load = self._load()
        response = await self._stub.Heartbeat(
            geosteer_pb2.HeartbeatRequest(
                node_id=self._node.node_id,
                active_sessions=load.active_sessions,
                capacity_sessions=self._node.capacity_sessions,
                draining=load.draining,
                cpu_load=self._cpu.read(),
            ),
            timeout=RPC_TIMEOUT_S,
        )
        self.heartbeats += 1
        return bool(response.known)

    async def report_now(self) -> None:
        """One heartbeat right away (draining started; the loop may be stopped next)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._heartbeat()

    async def _run(self) -> None:
        registered = False
        while True:
            try:
                if not registered:
                    await self._register()
                    registered = True
                else:
                    registered = await self._heartbeat()
            except grpc.aio.AioRpcError as exc:
                log_event(
                    logger,
                    "geosteer.unreachable",
                    level=logging.WARNING,
                    rpc__grpc__status_code=exc.code().name,
                    detail=exc.details() or "",
                )
                registered = False
                await self._pause(RETRY_S)
                continue
            if registered:
                await self._pause(self.interval_s)

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._stub.DeregisterNode(
                    geosteer_pb2.DeregisterNodeRequest(node_id=self._node.node_id),
                    timeout=RPC_TIMEOUT_S,
                )
        if self._on_stop is not None:
            await self._on_stop()
