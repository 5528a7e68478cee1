"""Extra worker processes sharing the public UDP address through SO_REUSEPORT.

Worker 0 runs in the main process next to the admin gRPC server. Workers 1..N-1 are
spawned processes, each with its own router, internal socket, Redis connection and
topology watch (the kernel spreads clients over the sockets by 4-tuple hash, and the Redis
copy lets any worker pick up a client another one bound). Each child pushes a counter
snapshot to the parent every SNAPSHOT_S over a pipe; the parent's admin API and metrics
sum them. A child exits when the parent asks, or when the pipe closes because the parent
died (even by SIGKILL), so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
from dataclasses import dataclass
from typing import Any

import uvloop

from libs.observability.telemetry import configure_logging, log_event
from libs.wire import ufrag
from services.relay.dataplane import DataPlane
from services.relay.router import CounterTotals, Router
from services.relay.settings import RelaySettings
from services.relay.store import BindingStore, make_binding_store
from services.relay.topology import make_topology_source

logger = logging.getLogger("voiceedge.relay.workers")

SNAPSHOT_S = 0.5
_COUNTERS = ("rx_packets", "rx_bytes", "fwd_packets", "fwd_bytes", "drop_packets", "drop_bytes")


class CounterSnapshot(CounterTotals):
    """The last counters a child reported, shaped like the Router fields the admin reads."""

    def __init__(self) -> None:
        self.rx_packets: list[list[int]] = []
        self.rx_bytes: list[list[int]] = []
        self.fwd_packets: list[list[int]] = []
        self.fwd_bytes: list[list[int]] = []
        self.drop_packets: list[list[int]] = []
        self.drop_bytes: list[list[int]] = []
        self.bindings_active = 0
        self.bindings_created = 0
        self.bindings_expired = 0
        self.draining = False

    def update(self, message: dict[str, Any]) -> None:
        for name in _COUNTERS:
            setattr(self, name, message[name])
        self.bindings_active = message["bindings_active"]
        self.bindings_created = message["bindings_created"]
        self.bindings_expired = message["bindings_expired"]

    def __len__(self) -> int:
        return self.bindings_active


@dataclass(frozen=True, slots=True)
class BindingInfo:
    """A child's binding as ListBindings needs it (same attribute names as Binding)."""

    client: tuple[str, int]
    cluster_id: int
    transceiver_id: int
    media: tuple[str, int]
    ufrag: str
    last_seen: float  # CLOCK_MONOTONIC, shared by all processes of the machine
    packets: int
    bytes: int
    created_at: float


class RemoteWorker:
    """The parent's handle on one child worker."""

    def __init__(self, settings: RelaySettings, worker_id: int) -> None:
        self.worker_id = worker_id
        self.router = CounterSnapshot()
        self.redis: tuple[int, ...] = (0, 0, 0, 0)  # hits, misses, errors, writes
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=worker_main,
            args=(settings, worker_id, child_conn),
            name=f"relay-worker-{worker_id}",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        self._ready = asyncio.get_running_loop().create_future()
        self._listings: list[asyncio.Future[list[BindingInfo]]] = []
        asyncio.get_running_loop().add_reader(self._conn.fileno(), self._on_message)
        self._closed = False

    def _on_message(self) -> None:
        try:
            message: dict[str, Any] = self._conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            if not self._ready.done():
                self._ready.set_exception(RuntimeError(f"worker {self.worker_id} died"))
            return
        if message.get("event") == "ready":
            if not self._ready.done():
                self._ready.set_result(message)
            return
        if message.get("event") == "bindings":
            if self._listings:
                waiter = self._listings.pop(0)
                if not waiter.done():
                    waiter.set_result([BindingInfo(*item) for item in message["items"]])
            return
        self.router.update(message)
        self.redis = tuple(message["redis"])

    async def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        result: dict[str, Any] = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        return result

    async def list_bindings(self, timeout_s: float = 10.0) -> list[BindingInfo]:
        """The child's whole table (one pipe round trip); empty if it does not answer."""
        waiter: asyncio.Future[list[BindingInfo]] = asyncio.get_running_loop().create_future()
        self._listings.append(waiter)
        try:
            self._conn.send(("bindings", 0.0))
            return await asyncio.wait_for(waiter, timeout_s)
        except (OSError, ValueError, TimeoutError):
            return []
        finally:
            if waiter in self._listings:
                self._listings.remove(waiter)

    def drain(self, grace_s: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("drain", grace_s))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.send(("stop", 0.0))
        await asyncio.to_thread(self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()
            await asyncio.to_thread(self._process.join, 10)
        self._conn.close()


async def make_worker(
    settings: RelaySettings, worker_id: int
) -> tuple[DataPlane, BindingStore, asyncio.Task[None]]:
    """One worker's router, store, sockets and topology watch, started."""
    keyring = ufrag.Keyring.parse(settings.ufrag_keys)
    source = make_topology_source(settings.transceivers, settings.geosteer_address)
    router = Router(
        keyring,
        source.current(),
        idle_timeout_s=settings.idle_timeout_s,
        drain_idle_s=settings.drain_idle_s,
        max_bindings=settings.max_bindings,
        verify_message_integrity=settings.verify_message_integrity,
    )
    store = make_binding_store(settings.redis_url, settings.binding_ttl_s, settings.redis_timeout_s)
    plane = DataPlane(
        router,
        store,
        udp_listen=settings.udp_listen,
        internal_listen=settings.internal_listen,
        binding_ttl_s=settings.binding_ttl_s,
        redis_max_inflight=settings.redis_max_inflight,
        worker_id=worker_id,
        batched_io=settings.batched_io,
    )
    try:
        await plane.start()
    except BaseException:
        await store.close()
        raise
    watch = asyncio.get_running_loop().create_task(source.run(router.set_topology))
    return plane, store, watch


def worker_main(
    settings: RelaySettings, worker_id: int, conn: multiprocessing.connection.Connection
) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(settings.log_level)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve_worker(settings, worker_id, conn))


async def _serve_worker(
    settings: RelaySettings, worker_id: int, conn: multiprocessing.connection.Connection
) -> None:
    plane, store, watch = await make_worker(settings, worker_id)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drain_task: asyncio.Task[None] | None = None

    async def drain_then_stop(grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        stop.set()

    def on_command() -> None:
        nonlocal drain_task
        try:
            command, value = conn.recv()
        except (EOFError, OSError):
            stop.set()  # the parent is gone
            return
        if command == "drain" and drain_task is None:
            plane.router.draining = True
            drain_task = loop.create_task(drain_then_stop(float(value)))
        elif command == "stop":
            stop.set()
        elif command == "bindings":
            items = [
                (
                    b.client,
                    b.cluster_id,
                    b.transceiver_id,
                    b.media,
                    b.ufrag,
                    b.last_seen,
                    b.packets,
                    b.bytes,
                    b.created_at,
                )
                for b in plane.router.bindings()
            ]
            with contextlib.suppress(OSError, ValueError):
                conn.send({"event": "bindings", "items": items})

    loop.add_reader(conn.fileno(), on_command)
    conn.send({"event": "ready", "udp": plane.public_addresses, "internal": plane.internal_address})
    log_event(logger, "relay.worker_started", worker=worker_id)
    try:
        while not stop.is_set():  # one snapshot per SNAPSHOT_S until stopped
            router = plane.router
            try:
                conn.send(
                    {
                        **{name: getattr(router, name) for name in _COUNTERS},
                        "bindings_active": len(router),
                        "bindings_created": router.bindings_created,
                        "bindings_expired": router.bindings_expired,
                        "redis": (store.hits, store.misses, store.errors, store.writes),
                    }
                )
            except (OSError, ValueError):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SNAPSHOT_S)
    finally:
        loop.remove_reader(conn.fileno())
        if drain_task is not None:
            drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain_task
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await plane.close()
        await store.close()
