"""RelayAdminService (stats, bindings, drain) and the OpenTelemetry instruments.

The hot path only bumps plain ints in the Router; metrics read them in observable
callbacks at collection time, so there is no metric call per packet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio
from opentelemetry import metrics

from libs.observability.metrics import (
    RELAY_BINDING_EVICTIONS,
    RELAY_BINDINGS,
    RELAY_BYTES,
    RELAY_DROPS,
    RELAY_PACKETS,
    RELAY_REDIS_OPS,
    RELAY_TCP_CLOSED,
    RELAY_TCP_CONNECTIONS,
    RELAY_TCP_FRAME_DROPS,
    RELAY_TCP_FRAMES,
    RELAY_TOPOLOGY_RETAINED,
    RELAY_WORKER_RESTARTS,
)
from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait, timestamp
from libs.wire.classify import PacketClass
from services.relay.dataplane import WorkerCounters
from services.relay.router import (
    CLASS_PROTO,
    DIRECTION_PROTO,
    DIRECTIONS,
    N_CLASSES,
    N_REASONS,
    BindingInfo,
    Matrix,
    RouterCounters,
)
from services.relay.store import BindingStore
from services.relay.tcp import CloseReason
from services.relay.topology import TopologyView
from voiceedge.common.v1 import common_pb2
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

logger = logging.getLogger("voiceedge.relay.admin")

Ctx = grpc.aio.ServicerContext

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _sort_key(client: tuple[str, int]) -> tuple[int, bytes, int]:
    ip = ipaddress.ip_address(client[0])
    return (ip.version, ip.packed, client[1])


def _encode_token(client: tuple[str, int]) -> str:
    return base64.urlsafe_b64encode(f"{client[0]}|{client[1]}".encode()).decode()


def _decode_token(token: str) -> tuple[int, bytes, int]:
    try:
        ip, sep, port = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        if not sep:
            raise ValueError("no separator")
        return _sort_key((ip, int(port)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("bad page_token") from None


class Worker(Protocol):
    """A data plane in this process (DataPlane) or a child process (RemoteWorker)."""

    worker_id: int

    def counters(self) -> WorkerCounters: ...

    def drain(self, grace_s: float) -> None: ...

    async def list_bindings(self) -> Sequence[BindingInfo]: ...

    async def close(self) -> None: ...


@dataclass
class RelayState:
    """What the admin API and metrics observe: the workers and the Redis store."""

    planes: list[Worker]
    store: BindingStore
    drain_grace_s: float
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    on_draining: Callable[[], None] | None = None  # e.g. tell geosteer at once
    topology: Callable[[], TopologyView] | None = None  # what worker 0 routes on
    degraded: bool = False  # a worker process is dead and not yet replaced
    worker_restarts: dict[int, int] = field(default_factory=dict)  # worker id -> count
    dead_workers: set[int] = field(default_factory=set)
    # Counters of replaced workers, so cumulative counters never go backwards.
    _retired: WorkerCounters = field(default_factory=WorkerCounters)
    _stop_task: asyncio.Task[None] | None = None

    def totals(self) -> WorkerCounters:
        """Every worker's counters added up (and those of replaced workers)."""
        return WorkerCounters.total(p.counters() for p in self.planes) + self._retired

    def worker_died(self, worker_id: int) -> None:
        self.dead_workers.add(worker_id)

    def replace_worker(self, old: Worker, new: Worker) -> None:
        """A dead worker's replacement is ready: it takes the old one's place."""
        last = old.counters()
        self._retired += dataclasses.replace(
            last, router=dataclasses.replace(last.router, bindings_active=0)
        )
        self.planes[self.planes.index(old)] = new
        self.worker_restarts[new.worker_id] = self.worker_restarts.get(new.worker_id, 0) + 1
        self.dead_workers.discard(new.worker_id)
        if self.draining:
            new.drain(self.drain_grace_s)

    def stats(self) -> relay_pb2.RelayStats:
        per_worker = [(p.worker_id, p.counters()) for p in self.planes]
        total = WorkerCounters.total(c for _, c in per_worker)
        router, redis = total.router, total.redis
        out = relay_pb2.RelayStats(
            started_at=timestamp(self.started_at),
            draining=self.draining,
            bindings_active=router.bindings_active,
            bindings_created=router.bindings_created,
            bindings_expired=router.bindings_expired,
            bindings_evicted=router.bindings_evicted,
            degraded=self.degraded,
            redis=relay_pb2.RedisStats(
                enabled=self.store.enabled,
                hits=redis.hits,
                misses=redis.misses if self.store.enabled else 0,
                errors=redis.errors,
                writes=redis.writes,
            ),
        )
        for direction in DIRECTIONS:
            for kind in range(N_CLASSES):
                values = (
                    router.rx_packets[direction][kind],
                    router.rx_bytes[direction][kind],
                    router.fwd_packets[direction][kind],
                    router.fwd_bytes[direction][kind],
                )
                if any(values):
                    out.traffic.append(
                        relay_pb2.TrafficCounter(
                            direction=DIRECTION_PROTO[direction],
                            packet_class=CLASS_PROTO[PacketClass(kind)],
                            packets_received=values[0],
                            bytes_received=values[1],
                            packets_forwarded=values[2],
                            bytes_forwarded=values[3],
                        )
                    )
            for reason in range(N_REASONS):
                packets = router.drop_packets[direction][reason]
                if packets:
                    out.drops.append(
                        relay_pb2.DropCounter(
                            direction=DIRECTION_PROTO[direction],
                            reason=reason,  # type: ignore[arg-type]
                            packets=packets,
                            bytes=router.drop_bytes[direction][reason],
                        )
                    )
        for worker_id, counters in per_worker:
            out.workers.append(
                relay_pb2.WorkerStats(
                    worker_id=worker_id,
                    packets_received=counters.router.packets_received,
                    packets_forwarded=counters.router.packets_forwarded,
                    packets_dropped=counters.router.packets_dropped,
                    bindings_active=counters.router.bindings_active,
                    alive=worker_id not in self.dead_workers,
                    restarts=self.worker_restarts.get(worker_id, 0),
                )
            )
        if self.topology is not None:
            view = self.topology()
            out.topology_transceivers = len(view.transceivers)
            out.topology_retained = len(view.retained)
        return out

    async def all_bindings(self) -> list[tuple[Worker, BindingInfo]]:
        """Every worker's bindings."""
        return [(plane, b) for plane in self.planes for b in await plane.list_bindings()]

    def start_drain(self, grace_s: float) -> int:
        """New clients refused from now on; forwarding stops after `grace_s`."""
        active = self.totals().router.bindings_active
        if self.draining:
            return active
        self.draining = True
        for plane in self.planes:
            plane.drain(grace_s)
        if self.on_draining is not None:
            self.on_draining()
        log_event(logger, "relay.draining", bindings=active, grace_s=grace_s)
        self._stop_task = asyncio.get_running_loop().create_task(self._stop_after(grace_s))
        return active

    async def _stop_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        # Poll the table (bounded by the grace period): calls ending early end the drain. The
        # table has no event to await: bindings leave by idle expiry on the data plane tick.
        while time.monotonic() < deadline and self._calls_left():  # noqa: ASYNC110
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        for plane in self.planes:
            await plane.close()

    def _calls_left(self) -> int:
        """UDP bindings and open ICE-TCP connections: what still holds a drain."""
        totals = self.totals()
        return totals.router.bindings_active + totals.tcp.open

    async def wait_drained(self) -> None:
        if self._stop_task is not None:
            await asyncio.shield(self._stop_task)

    async def close(self) -> None:
        await cancel_and_wait(self._stop_task)
        self._stop_task = None


def _address(address: tuple[str, int]) -> common_pb2.SocketAddress:
    return common_pb2.SocketAddress(ip=address[0], port=address[1])


class RelayAdmin(relay_pb2_grpc.RelayAdminServiceServicer):
    def __init__(self, state: RelayState) -> None:
        self._state = state

    async def GetStats(  # noqa: N802 (gRPC method name)
        self,
        request: relay_pb2.GetStatsRequest,
        context: Ctx[relay_pb2.GetStatsRequest, relay_pb2.GetStatsResponse],
    ) -> relay_pb2.GetStatsResponse:
        return relay_pb2.GetStatsResponse(stats=self._state.stats())

    async def ListBindings(  # noqa: N802 (gRPC method name)
        self,
        request: relay_pb2.ListBindingsRequest,
        context: Ctx[relay_pb2.ListBindingsRequest, relay_pb2.ListBindingsResponse],
    ) -> relay_pb2.ListBindingsResponse:
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after: tuple[int, bytes, int] | None = None
        if request.page_token:
            try:
                after = _decode_token(request.page_token)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
        entries = sorted(
            ((_sort_key(b.client), plane, b) for plane, b in await self._state.all_bindings()),
            key=lambda entry: entry[0],
        )
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        page = entries[:size]
        now_mono, now_wall = time.monotonic(), time.time()
        response = relay_pb2.ListBindingsResponse()
        for _, plane, b in page:
            response.bindings.append(
                relay_pb2.Binding(
                    client=_address(b.client),
                    cluster_id=b.cluster_id,
                    transceiver_id=b.transceiver_id,
                    transceiver_media_address=_address(b.media),
                    ufrag=b.ufrag,
                    last_seen=timestamp(now_wall - (now_mono - b.last_seen)),
                    packets=b.packets,
                    bytes=b.bytes,
                    created_at=timestamp(b.created_at),
                    worker_id=plane.worker_id,
                )
            )
        if len(entries) > size:
            response.next_page_token = _encode_token(page[-1][2].client)
        return response

    async def Drain(  # noqa: N802 (gRPC method name)
        self,
        request: relay_pb2.DrainRequest,
        context: Ctx[relay_pb2.DrainRequest, relay_pb2.DrainResponse],
    ) -> relay_pb2.DrainResponse:
        grace_s = (
            request.grace_period_ms / 1000 if request.grace_period_ms else self._state.drain_grace_s
        )
        return relay_pb2.DrainResponse(bindings_active=self._state.start_drain(grace_s))


_DIRECTION_LABEL = {0: "client_to_transceiver", 1: "transceiver_to_client"}
_Callback = Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]


def register_metrics(meter: metrics.Meter, state: RelayState) -> None:
    """voiceedge_relay_{packets,bytes,drops}_total, voiceedge_relay_bindings,
    voiceedge_relay_binding_evictions_total, voiceedge_relay_redis_ops_total, read from the
    workers' counters at collection time."""

    def traffic(stages: Callable[[RouterCounters], tuple[Matrix, Matrix]]) -> _Callback:
        def callback(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            received, forwarded = stages(state.totals().router)
            for direction in DIRECTIONS:
                for kind in range(N_CLASSES):
                    for stage, table in (("received", received), ("forwarded", forwarded)):
                        yield metrics.Observation(
                            table[direction][kind],
                            {
                                "direction": _DIRECTION_LABEL[direction],
                                "class": PacketClass(kind).name.lower(),
                                "stage": stage,
                            },
                        )

        return callback

    def drops(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        table = state.totals().router.drop_packets
        for direction in DIRECTIONS:
            for reason in range(1, N_REASONS):
                value = table[direction][reason]
                if value:
                    yield metrics.Observation(
                        value,
                        {
                            "direction": _DIRECTION_LABEL[direction],
                            "reason": relay_pb2.DropReason.Name(reason)  # type: ignore[arg-type]
                            .removeprefix("DROP_REASON_")
                            .lower(),
                        },
                    )

    def bindings(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        yield metrics.Observation(state.totals().router.bindings_active)

    def evictions(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        yield metrics.Observation(state.totals().router.bindings_evicted)

    def redis_ops(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if not state.store.enabled:
            return
        counts = state.totals().redis
        for result, value in (
            ("hit", counts.hits),
            ("miss", counts.misses),
            ("error", counts.errors),
            ("write", counts.writes),
        ):
            yield metrics.Observation(value, {"result": result})

    register_tcp_metrics(meter, state)
    RELAY_PACKETS.create(meter, [traffic(lambda c: (c.rx_packets, c.fwd_packets))])
    RELAY_BYTES.create(meter, [traffic(lambda c: (c.rx_bytes, c.fwd_bytes))])
    RELAY_DROPS.create(meter, [drops])
    RELAY_BINDINGS.create(meter, [bindings])
    RELAY_BINDING_EVICTIONS.create(meter, [evictions])
    RELAY_REDIS_OPS.create(meter, [redis_ops])

    def restarts(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        yield metrics.Observation(sum(state.worker_restarts.values()))

    def retained(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if state.topology is not None:
            yield metrics.Observation(len(state.topology().retained))

    RELAY_WORKER_RESTARTS.create(meter, [restarts])
    RELAY_TOPOLOGY_RETAINED.create(meter, [retained])


def register_tcp_metrics(meter: metrics.Meter, state: RelayState) -> None:
    """voiceedge_relay_tcp_connections{state}, voiceedge_relay_tcp_closed_total{reason},
    voiceedge_relay_tcp_frames_total{direction}, voiceedge_relay_tcp_frame_drops_total."""

    def connections(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        tcp = state.totals().tcp
        yield metrics.Observation(tcp.pending, {"state": "pending"})
        yield metrics.Observation(tcp.open, {"state": "open"})

    def closed(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for reason, value in zip(CloseReason, state.totals().tcp.closed, strict=True):
            if value:
                yield metrics.Observation(value, {"reason": reason.name.lower()})

    def frames(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        tcp = state.totals().tcp
        yield metrics.Observation(tcp.frames_in, {"direction": _DIRECTION_LABEL[0]})
        yield metrics.Observation(tcp.frames_out, {"direction": _DIRECTION_LABEL[1]})

    def drops(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        yield metrics.Observation(state.totals().tcp.frames_dropped)

    RELAY_TCP_CONNECTIONS.create(meter, [connections])
    RELAY_TCP_CLOSED.create(meter, [closed])
    RELAY_TCP_FRAMES.create(meter, [frames])
    RELAY_TCP_FRAME_DROPS.create(meter, [drops])
