"""Relay: the stateless single-port UDP edge that routes on the ICE ufrag.

Run: ./bazelw run //services/relay -- --help

Start-up puts the data plane first, because after a kill -9 the caller hears silence until
it forwards: worker 0 loads the persisted topology and the Redis bindings, binds its
sockets and starts the recall with only the modules forwarding needs; then the child
workers start; only then are gRPC (admin, health, the geosteer watch and registration) and
telemetry imported and started. `relay.forwarding` and the ready line carry the timeline
(`startup_ms`: milliseconds since the process started, launcher and interpreter included).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import uvloop

from libs.config.settings import SettingsError, load_settings, parse_host_port
from libs.observability.telemetry import configure_logging, log_event
from libs.service.aio import cancel_and_wait
from libs.service.cpus import usable_cpus
from libs.service.startclock import Timeline
from libs.service.tokens import TokenError, token_from_env
from libs.wire import ufrag
from services.relay.dataplane import DataPlane
from services.relay.limits import SharedReplayTable
from services.relay.settings import RelaySettings
from services.relay.store import BindingStore
from services.relay.workers import RemoteWorker, make_worker

if TYPE_CHECKING:
    from libs.observability.telemetry import Telemetry
    from libs.service.runtime import ServiceParts
    from services.geosteer.client import HeartbeatLoop
    from services.relay.servicer import RelayState

logger = logging.getLogger("voiceedge.relay")


@dataclasses.dataclass
class Planes:
    """Every worker's data plane, forwarding, before the admin side exists."""

    plane: DataPlane  # worker 0, in this process
    store: BindingStore
    watch: asyncio.Task[None]
    replays: SharedReplayTable
    child_settings: RelaySettings  # what a (re)spawned child worker runs with
    remotes: list[RemoteWorker] = dataclasses.field(default_factory=list)
    timeline: Timeline = dataclasses.field(default_factory=Timeline)
    _closed: bool = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self.watch)
        for remote in self.remotes:
            await remote.close()
        await self.plane.close()
        await self.store.close()
        self.replays.close()


async def start_planes(settings: RelaySettings, timeline: Timeline) -> Planes:
    """Worker 0 forwarding, then the child workers ready (each loads its bindings before it
    binds, so the kernel moving a flow to it costs no packet)."""
    if settings.ufrag_keys == ufrag.DEV_KEYRING_SPEC:
        log_event(logger, "relay.dev_keyring", level=logging.WARNING, detail="never in production")
    workers = settings.workers or usable_cpus()
    # One replay table for every worker: the kernel hashes a replay's ports anywhere.
    replays = SharedReplayTable.create(settings.replay_cache_size)
    try:
        plane, store, watch = await make_worker(settings, 0, replays, timeline.mark)
    except BaseException:
        replays.close()
        raise
    log_event(logger, "relay.forwarding", worker=0, **_ms(timeline))
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
    planes = Planes(plane, store, watch, replays, child_settings, timeline=timeline)
    try:
        for worker_id in range(1, workers):
            planes.remotes.append(RemoteWorker.spawn(child_settings, worker_id, replays.path))
        # Meanwhile the admin side's modules load in a thread: an import holds the loop
        # for as long as it runs (0.3-2 s here), and worker 0 now forwards on this loop.
        admin = asyncio.get_running_loop().run_in_executor(None, _import_admin)
        for remote in planes.remotes:
            await remote.wait_ready()
        timeline.mark("workers")
        await admin
    except BaseException:
        await planes.close()
        raise
    return planes


# What the admin side imports (gRPC, health, reflection, OpenTelemetry, Prometheus).
ADMIN_MODULES = (
    "libs.service.runtime",
    "services.relay.servicer",
    "services.geosteer.client",
    "opentelemetry.sdk.metrics.export",
    "opentelemetry.sdk.resources",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.prometheus",
    "prometheus_client",
)


def _import_admin() -> None:
    for name in ADMIN_MODULES:
        importlib.import_module(name)


def _ms(timeline: Timeline) -> dict[str, int]:
    return {f"startup_ms__{name}": ms for name, ms in timeline.marks.items()}


async def build(settings: RelaySettings, telemetry: Telemetry, planes: Planes) -> ServiceParts:
    """The admin side around data planes that already forward."""
    from libs.service.runtime import ServiceParts, Servicer
    from services.relay.servicer import RelayAdmin, RelayState, register_metrics
    from services.relay.workers import WorkerSupervisor
    from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

    plane, store, remotes, replays = planes.plane, planes.store, planes.remotes, planes.replays
    workers = 1 + len(remotes)
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
        planes.child_settings, remotes, on_degraded, state.replace_worker, replays.path
    )
    supervising = asyncio.get_running_loop().create_task(supervisor.run())

    def health(setter: Callable[[str, bool], Coroutine[Any, Any, None]]) -> None:
        nonlocal set_health
        set_health = setter
        if state.degraded:
            on_degraded(True)

    ready: dict[str, Any] = {
        "udp": list(plane.public_addresses),
        "tcp": plane.tcp.address if plane.tcp is not None else "",
        "internal": plane.internal_address,
        "workers": workers,
        "batched_io": plane.batched,
        "native_path": plane.native,
    }

    async def started(grpc_address: str) -> None:
        nonlocal reporter
        planes.timeline.mark("admin")
        ready["startup_ms"] = dict(planes.timeline.marks)  # the ready line is printed next
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
        await state.close()
        await planes.close()

    return ServiceParts(
        servicers=[
            Servicer(
                full_name, relay_pb2_grpc.add_RelayAdminServiceServicer_to_server, RelayAdmin(state)
            )
        ],
        drain=drain,
        close=close,
        ready=ready,
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
    from services.geosteer.client import HeartbeatLoop, NodeReport, ProcessCpuMeter
    from voiceedge.common.v1 import common_pb2
    from voiceedge.geosteer.v1 import geosteer_pb2

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
    timeline = Timeline()
    timeline.mark("main")  # launcher, interpreter and the data plane's imports
    try:
        settings = load_settings(
            RelaySettings,
            argv,
            env_prefix="VOICEEDGE_RELAY_",
            prog="relay",
            description=__doc__ or "",
        )
        token_from_env()  # refused here, before a port is bound (runtime reads it again)
    except (SettingsError, TokenError) as exc:
        from libs.service.runtime import exit_on_settings_error

        return exit_on_settings_error("relay", str(exc))
    configure_logging(settings.log_level)
    # uvloop's datagram path is several times faster than the default loop's (BENCHMARKS.md).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(_serve(settings, timeline))


async def _serve(settings: RelaySettings, timeline: Timeline) -> int:
    planes = await start_planes(settings, timeline)
    try:
        from libs.service.runtime import serve  # loaded by start_planes, off the loop

        async def built(s: RelaySettings, telemetry: Telemetry) -> ServiceParts:
            return await build(s, telemetry, planes)

        return await serve("relay", settings, built)
    finally:
        await planes.close()  # idempotent: the admin side's close() did it when it ran


if __name__ == "__main__":
    sys.exit(main())
