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
import time
from collections.abc import Callable, Sequence

import uvloop

from libs.observability.telemetry import configure_logging, log_event
from libs.service.aio import cancel_and_wait
from libs.service.startclock import Timeline
from libs.wire import ufrag
from services.relay import messages
from services.relay.dataplane import DataPlane, WorkerCounters
from services.relay.limits import ReplayTable, SharedReplayTable
from services.relay.recall import BindingRecall
from services.relay.router import BindingInfo, Router, make_router
from services.relay.settings import RelaySettings
from services.relay.store import BindingStore, make_binding_store
from services.relay.tcp import make_tcp_plane
from services.relay.topology import (
    TopologySource,
    TopologyView,
    decode_view,
    make_topology_source,
)

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
        self.died: asyncio.Future[None] = loop.create_future()  # the pipe closed
        self._listings: dict[int, asyncio.Future[tuple[BindingInfo, ...]]] = {}
        self._request_ids = itertools.count(1)
        loop.add_reader(self._conn.fileno(), self._on_message)
        self._closed = False

    @classmethod
    def spawn(cls, settings: RelaySettings, worker_id: int, replays_path: str) -> RemoteWorker:
        context = multiprocessing.get_context("spawn")
        conn, child_conn = context.Pipe()
        process = context.Process(
            target=worker_main,
            args=(settings, worker_id, child_conn, replays_path),
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
                self._ready.exception()  # retrieved: whoever waits sees it, nobody must
            if not self.died.done():
                self.died.set_result(None)
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

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

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


class WorkerSupervisor:
    """Replaces a child worker whose process died (crash, OOM kill, kill -9): the same
    worker id and settings, bound to the same SO_REUSEPORT ports. While one is missing the
    relay is degraded (`on_degraded(True)`, then False once every worker is back). The
    dead worker's clients are rehashed by the kernel onto the remaining sockets; with Redis
    they carry on from the shared copy, in memory mode from their next STUN check."""

    def __init__(
        self,
        settings: RelaySettings,
        workers: list[RemoteWorker],
        on_degraded: Callable[[bool], None],
        on_replaced: Callable[[RemoteWorker, RemoteWorker], None],
        replays_path: str,
        retry_s: float = 1.0,
    ) -> None:
        self._settings = settings
        self._replays_path = replays_path
        self._workers = workers  # replaced in place
        self._on_degraded = on_degraded
        self._on_replaced = on_replaced
        self._retry_s = retry_s
        self.restarts = 0
        self.dead: set[int] = set()

    async def run(self) -> None:
        while self._workers:  # until cancelled; one turn per worker death
            waits = {asyncio.ensure_future(w.died): w for w in self._workers}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in done:
                await self._replace(waits[task])

    async def _replace(self, old: RemoteWorker) -> None:
        self.dead.add(old.worker_id)
        self._on_degraded(True)
        log_event(
            logger, "relay.worker_died", level=logging.WARNING, worker=old.worker_id, pid=old.pid
        )
        await old.close()
        while True:  # until the replacement is ready; one try per retry_s
            new = RemoteWorker.spawn(self._settings, old.worker_id, self._replays_path)
            try:
                await new.wait_ready()
            except (RuntimeError, TimeoutError) as exc:
                await new.close()
                log_event(
                    logger,
                    "relay.worker_respawn_failed",
                    level=logging.WARNING,
                    worker=old.worker_id,
                    error=str(exc),
                )
                await asyncio.sleep(self._retry_s)
                continue
            break
        index = self._workers.index(old)
        self._workers[index] = new
        self.restarts += 1
        self.dead.discard(old.worker_id)
        self._on_replaced(old, new)
        log_event(
            logger,
            "relay.worker_replaced",
            worker=new.worker_id,
            pid=new.pid,
            restarts=self.restarts,
        )
        if not self.dead:
            self._on_degraded(False)


async def make_worker(
    settings: RelaySettings,
    worker_id: int,
    replays: ReplayTable | None = None,
    mark: Callable[[str], None] = lambda name: None,
) -> tuple[DataPlane, BindingStore, asyncio.Task[None]]:
    """One worker's router, store, sockets and topology watch, started; `mark` is told
    each start-up step as it ends (the start-up timeline)."""
    keyring = ufrag.Keyring.parse(settings.ufrag_keys)
    source = make_topology_source(settings.transceivers, settings.geosteer_address)
    store = make_binding_store(settings.redis_url, settings.binding_ttl_s, settings.redis_timeout_s)
    # Before any socket opens: the last topology and the bindings from the shared copy, so
    # a relay (re)started while geosteer is down forwards its calls' first packets.
    copy = await _load_topology(store, settings.preload_timeout_s)
    mark("topology")
    router = make_router(settings, keyring, copy, replays=replays)
    router.set_topology(source.current())
    preloaded = await _preload(router, store, settings)
    mark("bindings")
    log_event(
        logger,
        "relay.preloaded",
        worker=worker_id,
        transceivers=len(router.topology.transceivers),
        bindings=preloaded,
    )
    tcp = make_tcp_plane(settings, keyring, router.topology, worker_id)
    plane = DataPlane(
        router,
        store,
        udp_listen=settings.udp_listen,
        internal_listen=settings.internal_listen,
        binding_ttl_s=settings.binding_ttl_s,
        redis_max_inflight=settings.redis_max_inflight,
        worker_id=worker_id,
        batched_io=settings.batched_io,
        native_path=settings.native_path,
        udp_gso=settings.udp_gso,
        tcp=tcp,
        persist_topology=worker_id == 0,
    )
    recaller = BindingRecall(router, keyring, settings.internal_listen, worker_id)
    try:
        await plane.start()
        mark("sockets")
        if settings.recall_bindings:
            await recaller.start()  # after the sockets: what it installs is forwarded at once
    except BaseException:
        await plane.close()  # idempotent, also after a start that failed halfway
        await store.close()
        raise
    routers = [router] if tcp is None else [router, tcp.router]

    def set_topology(view: TopologyView) -> None:
        for each in routers:
            each.set_topology(view)
        recaller.greet(router.topology)

    watch = asyncio.get_running_loop().create_task(_watch(source, set_topology, recaller))
    mark("forwarding")
    return plane, store, watch


async def _watch(
    source: TopologySource, on_update: Callable[[TopologyView], None], recaller: BindingRecall
) -> None:
    """The topology watch; the recall's socket closes with it."""
    try:
        await source.run(on_update)
    finally:
        recaller.close()


async def _load_topology(store: BindingStore, timeout_s: float) -> TopologyView:
    """The persisted topology (Redis), or an empty view without one."""
    try:
        text = await asyncio.wait_for(store.load_topology(), timeout_s)
    except TimeoutError:
        text = None
    if text is None:
        return TopologyView()
    try:
        return decode_view(text, time.time())
    except ValueError as exc:
        log_event(logger, "topology.bad_copy", level=logging.WARNING, error=str(exc))
        return TopologyView()


async def _preload(router: Router, store: BindingStore, settings: RelaySettings) -> int:
    """The Redis copy's bindings, as many as `preload_timeout_s` allows (each worker holds
    the whole copy: the kernel may hash any client to it)."""
    deadline = time.monotonic() + settings.preload_timeout_s
    entries = await store.scan(settings.max_bindings, deadline)
    return router.preload(entries, time.monotonic())


def worker_main(
    settings: RelaySettings,
    worker_id: int,
    conn: multiprocessing.connection.Connection,
    replays_path: str = "",
) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(settings.log_level)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve_worker(settings, worker_id, conn, _attach_replays(replays_path, settings)))


def _attach_replays(path: str, settings: RelaySettings) -> ReplayTable | None:
    """The parent's shared replay table; None (this worker's own cache) if it cannot be
    opened (e.g. /proc/<pid>/fd not readable here): weaker, but never a crash loop."""
    if not path:
        return None
    try:
        return SharedReplayTable.attach(path, settings.replay_cache_size)
    except OSError as exc:
        log_event(logger, "relay.replay_table_unshared", level=logging.WARNING, error=str(exc))
        return None


async def _serve_worker(
    settings: RelaySettings,
    worker_id: int,
    conn: multiprocessing.connection.Connection,
    replays: ReplayTable | None,
) -> None:
    timeline = Timeline()
    timeline.mark("main")  # the spawned interpreter and its imports
    plane, store, watch = await make_worker(settings, worker_id, replays, timeline.mark)
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
    log_event(
        logger,
        "relay.worker_started",
        worker=worker_id,
        **{f"startup_ms__{name}": ms for name, ms in timeline.marks.items()},
    )
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
