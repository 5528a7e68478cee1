"""Extra worker processes sharing the public UDP address through SO_REUSEPORT.

Worker 0 runs in the main process next to the admin gRPC server. Workers 1..N-1 are
spawned processes, each with its own router, internal socket, Redis connection and
topology watch (the kernel spreads clients over the sockets by 4-tuple hash, and the Redis
copy lets any worker pick up a client another one bound). Each child pushes its counters
to the parent every SNAPSHOT_S over a pipe (the frozen messages of `messages.py`); the
parent's admin API and metrics add them up. A child exits when the parent asks, or when
the pipe closes because the parent died (even by SIGKILL), so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Sequence

import uvloop

from libs.observability.telemetry import configure_logging, log_event
from libs.service.aio import cancel_and_wait
from libs.wire import ufrag
from services.relay import messages
from services.relay.dataplane import DataPlane, WorkerCounters
from services.relay.router import BindingInfo, make_router
from services.relay.settings import RelaySettings
from services.relay.store import BindingStore, make_binding_store
from services.relay.tcp import make_tcp_plane
from services.relay.topology import TopologyView, make_topology_source

logger = logging.getLogger("voiceedge.relay.workers")

SNAPSHOT_S = 0.5


def _bad_message(worker_id: int, count: int, error: Exception) -> None:
    # A peer sending garbage would otherwise log once per message.
    if count == 1 or count % 1000 == 0:
        log_event(
            logger,
            "relay.bad_worker_message",
            level=logging.WARNING,
            worker=worker_id,
            bad_messages=count,
            error=str(error),
        )


class RemoteWorker:
    """The main process's handle on one child worker: its last counters, and the commands
    it can send. `spawn` starts the child; the constructor takes any connection speaking
    `messages` (a test can play the child on a plain Pipe)."""

    def __init__(
        self,
        worker_id: int,
        conn: multiprocessing.connection.Connection,
        process: multiprocessing.process.BaseProcess | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.bad_messages = 0  # undecodable or unexpected messages from the child, dropped
        self._counters = WorkerCounters()
        self._conn = conn
        self._process = process
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[messages.Ready] = loop.create_future()
        self._listings: dict[int, asyncio.Future[tuple[BindingInfo, ...]]] = {}
        self._request_ids = itertools.count(1)
        loop.add_reader(self._conn.fileno(), self._on_message)
        self._closed = False

    @classmethod
    def spawn(cls, settings: RelaySettings, worker_id: int) -> RemoteWorker:
        context = multiprocessing.get_context("spawn")
        conn, child_conn = context.Pipe()
        process = context.Process(
            target=worker_main,
            args=(settings, worker_id, child_conn),
            name=f"relay-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return cls(worker_id, conn, process)

    def counters(self) -> WorkerCounters:
        """What the child last reported (at most SNAPSHOT_S old)."""
        return self._counters

    def _on_message(self) -> None:
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            if not self._ready.done():
                self._ready.set_exception(RuntimeError(f"worker {self.worker_id} died"))
            return
        try:
            message = messages.decode(data)
        except messages.MessageError as exc:
            self._dropped(exc)
            return
        match message:
            case messages.CountersReport(counters):
                self._counters = counters
            case messages.BindingsReply(request_id, bindings):
                waiter = self._listings.pop(request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(bindings)
            case messages.Ready():
                if not self._ready.done():
                    self._ready.set_result(message)
            case _:
                self._dropped(messages.MessageError(f"unexpected {type(message).__name__}"))

    def _dropped(self, error: Exception) -> None:
        self.bad_messages += 1
        _bad_message(self.worker_id, self.bad_messages, error)

    async def wait_ready(self, timeout_s: float = 60.0) -> messages.Ready:
        return await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)

    def _send(self, message: messages.Message) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send_bytes(messages.encode(message))

    async def list_bindings(self, timeout_s: float = 10.0) -> Sequence[BindingInfo]:
        """The child's whole table (one pipe round trip); empty if it does not answer."""
        request_id = next(self._request_ids)
        waiter: asyncio.Future[tuple[BindingInfo, ...]] = asyncio.get_running_loop().create_future()
        self._listings[request_id] = waiter
        try:
            self._send(messages.ListBindings(request_id))
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return ()
        finally:
            self._listings.pop(request_id, None)

    def drain(self, grace_s: float) -> None:
        self._send(messages.Drain(grace_s))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._send(messages.Stop())
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 10)
        self._conn.close()


async def make_worker(
    settings: RelaySettings, worker_id: int
) -> tuple[DataPlane, BindingStore, asyncio.Task[None]]:
    """One worker's router, store, sockets and topology watch, started."""
    keyring = ufrag.Keyring.parse(settings.ufrag_keys)
    source = make_topology_source(settings.transceivers, settings.geosteer_address)
    router = make_router(settings, keyring, source.current())
    store = make_binding_store(settings.redis_url, settings.binding_ttl_s, settings.redis_timeout_s)
    tcp = make_tcp_plane(settings, keyring, source.current(), worker_id)
    plane = DataPlane(
        router,
        store,
        udp_listen=settings.udp_listen,
        internal_listen=settings.internal_listen,
        binding_ttl_s=settings.binding_ttl_s,
        redis_max_inflight=settings.redis_max_inflight,
        worker_id=worker_id,
        batched_io=settings.batched_io,
        tcp=tcp,
    )
    try:
        await plane.start()
    except BaseException:
        await store.close()
        raise
    routers = [router] if tcp is None else [router, tcp.router]

    def set_topology(view: TopologyView) -> None:
        for each in routers:
            each.set_topology(view)

    watch = asyncio.get_running_loop().create_task(source.run(set_topology))
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

    bad_messages = 0

    def on_command() -> None:
        nonlocal drain_task, bad_messages
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            stop.set()  # the parent is gone
            return
        try:
            message = messages.decode(data)
        except messages.MessageError as exc:
            bad_messages += 1
            _bad_message(worker_id, bad_messages, exc)
            return
        match message:
            case messages.Drain(grace_s):
                if drain_task is None:
                    plane.drain(grace_s)
                    drain_task = loop.create_task(drain_then_stop(grace_s))
            case messages.Stop():
                stop.set()
            case messages.ListBindings(request_id):
                infos = tuple(b.info() for b in plane.router.bindings())
                send(messages.BindingsReply(request_id, infos))
            case _:
                bad_messages += 1
                _bad_message(worker_id, bad_messages, ValueError(type(message).__name__))

    def send(message: messages.Message) -> bool:
        try:
            conn.send_bytes(messages.encode(message))
        except (OSError, ValueError):
            return False
        return True

    loop.add_reader(conn.fileno(), on_command)
    send(messages.Ready(tuple(plane.public_addresses), plane.internal_address))
    log_event(logger, "relay.worker_started", worker=worker_id)
    try:
        while not stop.is_set():  # one snapshot per SNAPSHOT_S until stopped
            if not send(messages.CountersReport(plane.counters())):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SNAPSHOT_S)
    finally:
        loop.remove_reader(conn.fileno())
        await cancel_and_wait(drain_task, watch)
        await plane.close()
        await store.close()
