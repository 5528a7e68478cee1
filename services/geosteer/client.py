"""Client side of node registration, for relays, transceivers, signaling and bridges.

    loop = HeartbeatLoop(channel, node, report=lambda: NodeReport(active_sessions=n))
    loop.start()
    ...
    await loop.close()   # deregisters (best effort) and stops

Registers, heartbeats at the interval geosteer returns, registers again when geosteer
answers known=false (it restarted or dropped the node), and keeps retrying with capped
backoff while geosteer is unreachable.

Several geosteer replicas (sharing one Redis registry): `geosteer_address` settings take
`host:port`, a DNS name (every address it resolves to) or a comma-separated list of IP
literal host:ports; `geosteer_channel` spreads calls over them (gRPC round_robin), skips a
replica that is down, and retries a call refused as UNAVAILABLE on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from libs.service.auth import internal_channel
from services.geosteer.target import geosteer_target
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

logger = logging.getLogger("voiceedge.geosteer.client")

RPC_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0

# Round robin over every address (a dead replica's subchannel drops out of the pick until it
# reconnects), and a call that a replica refuses as UNAVAILABLE (it is stopping, or its
# registry is unreachable) is tried again on another: every geosteer RPC may be repeated.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "voiceedge.geosteer.v1.GeosteerService"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

RECONNECT_INITIAL_MS = 200
RECONNECT_MAX_MS = 2000
# While a call is open (a WatchTopology stream always is), an HTTP/2 ping every
# KEEPALIVE_MS, unanswered for KEEPALIVE_TIMEOUT_MS, closes the connection: a replica whose
# host vanished without a TCP reset is left within 15 s instead of TCP's minutes. Servers
# allow it (libs/service/runtime.py SERVER_OPTIONS).
KEEPALIVE_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000


def geosteer_channel(address: str) -> grpc.aio.Channel:
    """A channel to geosteer at a `geosteer_address` setting (see `geosteer_target`)."""
    return internal_channel(
        geosteer_target(address),
        options=[
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            # A replica that comes back is used again within RECONNECT_MAX_MS (gRPC's
            # default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            # grpc-core times the keepalive ping out by this one (1 minute by default).
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),  # a quiet stream is still watched
        ],
    )


@dataclass(frozen=True)
class NodeReport:
    """What the node says about itself in each heartbeat."""

    active_sessions: int = 0
    capacity_sessions: int = 0  # 0: unchanged since registration
    draining: bool = False
    cpu_load: float = 0.0
    rtt_samples: Sequence[geosteer_pb2.RttSample] = field(default=())


class ProcessCpuMeter:
    """This process's CPU time over wall time since the previous reading, 0.0 to 1.0 of one
    core (services run their sessions on one event loop): the `cpu_load` of heartbeats."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def read(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        used = (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._cpu, self._wall = cpu, wall
        return min(max(used, 0.0), 1.0)


class HeartbeatLoop:
    """Keeps one node registered with geosteer for as long as it runs."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        node: geosteer_pb2.Node,
        report: Callable[[], NodeReport] = NodeReport,
    ) -> None:
        self._stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        self._owned_channel: grpc.aio.Channel | None = None
        self._node = node
        self._report = report
        self._task: asyncio.Task[None] | None = None
        self.interval_s = 1.0
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0
        self._wake = asyncio.Event()

    @classmethod
    def to_address(
        cls, address: str, node: geosteer_pb2.Node, report: Callable[[], NodeReport] = NodeReport
    ) -> HeartbeatLoop:
        """A loop with its own channel to `address` (a `geosteer_address` setting: one or
        several replicas), closed by `close()`."""
        channel = geosteer_channel(address)
        loop = cls(channel, node, report)
        loop._owned_channel = channel
        return loop

    def poke(self) -> None:
        """Report now (e.g. draining just started) instead of at the next interval."""
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def report_now(self) -> None:
        """One heartbeat right away, best effort (draining started; the loop may stop next)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.beat()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def register(self) -> None:
        node = geosteer_pb2.Node()
        node.CopyFrom(self._node)
        report = self._report()
        node.active_sessions = report.active_sessions
        node.draining = report.draining
        response = await self._stub.RegisterNode(
            geosteer_pb2.RegisterNodeRequest(node=node), timeout=RPC_TIMEOUT_S
        )
        self.interval_s = max(0.01, response.heartbeat_interval_ms / 1000)
        self.registrations += 1
        self.registered.set()
        log_event(logger, "geosteer.registered", node__id=self._node.node_id)

    async def beat(self) -> bool:
        """One heartbeat; returns geosteer's `known`."""
        report = self._report()
        response = await self._stub.Heartbeat(
            geosteer_pb2.HeartbeatRequest(
                node_id=self._node.node_id,
                active_sessions=report.active_sessions,
                capacity_sessions=report.capacity_sessions,
                draining=report.draining,
                cpu_load=report.cpu_load,
                rtt_samples=list(report.rtt_samples),
            ),
            timeout=RPC_TIMEOUT_S,
        )
        self.heartbeats += 1
        return bool(response.known)

    async def run(self) -> None:
        """Runs until cancelled."""
        backoff_s = 0.1
        need_register = True
        while True:
            try:
                if need_register:
                    await self.register()
                    need_register = False
                else:
                    need_register = not await self.beat()
                    if need_register:
                        self.registered.clear()
                        log_event(logger, "geosteer.unknown_node", node__id=self._node.node_id)
                        continue
                backoff_s = 0.1
                await self._pause(self.interval_s)
            except grpc.aio.AioRpcError as exc:
                log_event(
                    logger,
                    "geosteer.unreachable",
                    level=logging.WARNING,
                    node__id=self._node.node_id,
                    rpc__grpc__status_code=exc.code().name,
                )
                await asyncio.sleep(backoff_s * (0.5 + random.random()))
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)

    async def close(self, deregister: bool = True) -> None:
        """Stops heartbeating and, by default, removes the node at once. Idempotent."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if deregister and self.registered.is_set():
            self.registered.clear()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._stub.DeregisterNode(
                    geosteer_pb2.DeregisterNodeRequest(node_id=self._node.node_id),
                    timeout=RPC_TIMEOUT_S,
                )
        channel, self._owned_channel = self._owned_channel, None
        if channel is not None:
            await channel.close(None)
