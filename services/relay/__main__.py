"""Relay: the stateless single-port UDP edge that routes on the ICE ufrag.

Run: ./bazelw run //services/relay -- --help
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import uvloop

from libs.config.settings import parse_host_port
from libs.observability.telemetry import Telemetry, log_event
from libs.service.aio import cancel_and_wait
from libs.service.cpus import usable_cpus
from libs.service.runtime import ServiceParts, Servicer, service_main
from libs.wire import ufrag
from services.geosteer.client import HeartbeatLoop, NodeReport, ProcessCpuMeter
from services.relay.limits import SharedReplayTable
from services.relay.servicer import RelayAdmin, RelayState, register_metrics
from services.relay.settings import RelaySettings
from services.relay.workers import RemoteWorker, WorkerSupervisor, make_worker
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

logger = logging.getLogger("voiceedge.relay")


async def build(settings: RelaySettings, telemetry: Telemetry) -> ServiceParts:
    if settings.ufrag_keys == ufrag.DEV_KEYRING_SPEC:
        log_event(logger, "relay.dev_keyring", level=logging.WARNING, detail="never in production")
    workers = settings.workers or usable_cpus()
    # One replay table for every worker: the kernel hashes a replay's ports anywhere.
    replays = SharedReplayTable.create(settings.replay_cache_size)
    plane, store, watch = await make_worker(settings, 0, replays)
    # Children bind the ports worker 0 got (port 0 picks one) and their own internal socket.
    internal_host = settings.internal_listen.rpartition(":")[0]
    child_settings = dataclasses.replace(
        settings,
        udp_listen=tuple(plane.public_addresses),
        tcp_listen=plane.tcp.address if plane.tcp is not None else "",
        internal_listen=f"{internal_host}:0",
        metrics_listen="",
        otlp_endpoint="",
    )
    remotes: list[RemoteWorker] = []
    try:
        for worker_id in range(1, workers):
            remotes.append(RemoteWorker.spawn(child_settings, worker_id, replays.path))
        for remote in remotes:
            await remote.wait_ready()
    except BaseException:
        for remote in remotes:
            await remote.close()
        await cancel_and_wait(watch)
        await plane.close()
        await store.close()
        replays.close()
        raise

    state = RelayState(
        [plane, *remotes], store, settings.drain_grace_s, topology=lambda: plane.router.topology
    )
    register_metrics(telemetry.meter, state)
    reporter: HeartbeatLoop | None = None
    full_name = relay_pb2.DESCRIPTOR.services_by_name["RelayAdminService"].full_name
    set_health: Callable[[str, bool], Coroutine[Any, Any, None]] | None = None
    health_tasks: set[asyncio.Task[None]] = set()

    def on_degraded(degraded: bool) -> None:
        # The relay's own service name says NOT_SERVING while a worker is missing; ""
        # (what readiness probes ask) stays SERVING: the other workers still forward, and
        # leaving the load balancer would move calls that are fine.
        state.degraded = degraded
        if degraded:
            for worker_id in {w.worker_id for w in remotes if w.died.done()}:
                state.worker_died(worker_id)
        if set_health is not None and not state.draining:
            task = asyncio.get_running_loop().create_task(set_health(full_name, not degraded))
            health_tasks.add(task)
            task.add_done_callback(health_tasks.discard)

    supervisor = WorkerSupervisor(
        child_settings, remotes, on_degraded, state.replace_worker, replays.path
    )
    supervising = asyncio.get_running_loop().create_task(supervisor.run())

    def health(setter: Callable[[str, bool], Coroutine[Any, Any, None]]) -> None:
        nonlocal set_health
        set_health = setter
        if state.degraded:
            on_degraded(True)

    async def started(grpc_address: str) -> None:
        nonlocal reporter
        reporter = start_reporter(settings, state, workers, grpc_address)

    async def drain(grace_s: float) -> None:
        await cancel_and_wait(supervising)  # no respawns while the relay goes away
        state.start_drain(grace_s)
        if reporter is not None:
            await reporter.report_now()
        await state.wait_drained()

    async def close() -> None:
        await cancel_and_wait(supervising, *health_tasks)
        if reporter is not None:
            await reporter.close()  # deregisters from geosteer, closes the channel
        await cancel_and_wait(watch)
        await state.close()
        for remote in remotes:
            await remote.close()
        await plane.close()
        await store.close()
        replays.close()

    return ServiceParts(
        servicers=[
            Servicer(
                full_name, relay_pb2_grpc.add_RelayAdminServiceServicer_to_server, RelayAdmin(state)
            )
        ],
        drain=drain,
        close=close,
        ready={
            "udp": list(plane.public_addresses),
            "tcp": plane.tcp.address if plane.tcp is not None else "",
            "internal": plane.internal_address,
            "workers": workers,
            "batched_io": plane.batched,
            "native_path": plane.native,
        },
        started=started,
        health=health,
    )


def start_reporter(
    settings: RelaySettings, state: RelayState, workers: int, grpc_address: str
) -> HeartbeatLoop | None:
    """Registers the advertised VIPs with geosteer in cluster_id and heartbeats the binding
    count and the drain flag (geosteer stops handing out a draining relay's VIPs)."""
    if not settings.public_advertise:
        return None
    endpoints = [
        (*parse_host_port(a, "public_advertise"), False) for a in settings.public_advertise
    ] + [(*parse_host_port(a, "tcp_advertise"), True) for a in settings.tcp_advertise]
    node = geosteer_pb2.Node(
        node_id=settings.node_id
        or f"relay-{settings.cluster_id}-{socket.gethostname()}-{os.getpid()}",
        kind=common_pb2.NODE_KIND_RELAY,
        cluster_id=settings.cluster_id,
        grpc_address=grpc_address,
        public_endpoints=[
            common_pb2.SocketAddress(ip=ip, port=port, tcp=tcp) for ip, port, tcp in endpoints
        ],
        capacity_sessions=settings.max_bindings * workers,
    )
    cpu = ProcessCpuMeter()
    reporter = HeartbeatLoop.to_address(
        settings.geosteer_address,
        node,
        lambda: NodeReport(
            active_sessions=state.totals().router.bindings_active,
            draining=state.draining,
            cpu_load=cpu.read(),
        ),
    )
    state.on_draining = reporter.poke
    reporter.start()
    return reporter


def main(argv: Sequence[str] | None = None) -> int:
    # uvloop's datagram path is several times faster than the default loop's (BENCHMARKS.md).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return service_main(
        argv, name="relay", settings_cls=RelaySettings, description=__doc__ or "", build=build
    )


if __name__ == "__main__":
    sys.exit(main())
