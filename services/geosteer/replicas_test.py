"""Two geosteer replicas on one real Redis, each a real gRPC server on 127.0.0.1:0, real
clocks: what one replica is told, the other serves; a client given both addresses carries
on when one stops."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis

from libs.service.redis_testing import Redis, redis_server
from services.geosteer.client import HeartbeatLoop, geosteer_channel
from services.geosteer.geosteer_testing import FRANKFURT_IP, TOPOLOGY, Served, serve_geosteer
from services.geosteer.geosteer_testing import transceiver as geosteer_transceiver
from services.geosteer.selection import Endpoint, NodeKind, NodeState
from services.geosteer.settings import GeosteerSettings
from services.geosteer.store import RedisNodeStore, decode_event, decode_node, encode_node
from services.geosteer.target import geosteer_target
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

TIMEOUT_S = 10.0


@pytest.fixture
def redis_instance() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


@asynccontextmanager
async def replica(tmp_path: Path, redis_url: str) -> AsyncIterator[Served]:
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    settings = GeosteerSettings(
        grpc_listen="127.0.0.1:0",
        topology_path=str(path),
        # Leases long enough that a loaded machine never loses one between two steps.
        heartbeat_interval_ms=200,
        heartbeat_ttl_ms=2000,
        redis_url=redis_url,
    )
    async with serve_geosteer(settings) as served:
        yield served


def transceiver(cluster_id: int, tid: int) -> geosteer_pb2.Node:
    return geosteer_transceiver(cluster_id, tid, capacity=10)


def node_ids(topology: geosteer_pb2.Topology) -> set[str]:
    return {n.node_id for c in topology.clusters for n in c.nodes}


async def next_topology(
    call: Any,
    predicate: Callable[[set[str]], bool],
) -> geosteer_pb2.Topology:
    """Reads the watch stream until a topology whose node ids satisfy `predicate`."""
    for _ in range(100):
        message = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert isinstance(message, geosteer_pb2.WatchTopologyResponse), message
        if predicate(node_ids(message.topology)):
            return message.topology
    raise AssertionError("the topology never reached the expected state")


async def route(
    stub: geosteer_pb2_grpc.GeosteerServiceAsyncStub,
) -> geosteer_pb2.RouteSessionResponse:
    request = geosteer_pb2.RouteSessionRequest(client_ip=FRANKFURT_IP)
    response: geosteer_pb2.RouteSessionResponse = await stub.RouteSession(request, timeout=5)
    return response


@pytest.mark.timeout_s(45)
async def test_replicas_share_registrations_leases_watches_and_rtts(
    tmp_path: Path, redis_instance: Redis
) -> None:
    async with (
        replica(tmp_path, redis_instance.url) as a,
        replica(tmp_path, redis_instance.url) as b,
    ):
        watch_a = a.stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
        watch_b = b.stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
        try:
            await next_topology(watch_b, lambda ids: not ids)
            # Registered through A: B's watchers see it, B routes to it, B renews it.
            await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(1, 1)))
            await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(2, 2)))
            await next_topology(watch_b, lambda ids: ids == {"t1-1", "t2-2"})
            assert [t.node_id for t in (await route(b.stub)).transceivers] == ["t1-1"]
            heartbeat = geosteer_pb2.HeartbeatRequest(node_id="t1-1", active_sessions=3)
            assert (await b.stub.Heartbeat(heartbeat)).known
            listed = (await a.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
            assert listed.clusters[0].active_sessions == 3
            # The same transceiver id through the other replica is still taken.
            clash = transceiver(1, 1)
            clash.node_id = "impostor"
            with pytest.raises(grpc.aio.AioRpcError) as taken:
                await b.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=clash))
            assert taken.value.code() is grpc.StatusCode.ALREADY_EXISTS

            # RTTs reported to B steer A's answers: Amsterdam measured at 2 ms.
            sample = geosteer_pb2.RttSample(
                client_prefix="194.25.0.0/24", rtt_ms=2.0, sample_count=4
            )
            for node_id in ("t1-1", "t2-2"):  # keep both leases while this part runs
                assert (
                    await a.stub.Heartbeat(geosteer_pb2.HeartbeatRequest(node_id=node_id))
                ).known
            assert (
                await b.stub.Heartbeat(
                    geosteer_pb2.HeartbeatRequest(node_id="t2-2", rtt_samples=[sample])
                )
            ).known
            for _ in range(100):  # the report travels by pub/sub: bounded wait
                if a.geosteer.directory.rtt.lookup(FRANKFURT_IP):
                    break
                await asyncio.sleep(0.02)
            answer = await route(a.stub)
            assert answer.cluster.cluster_id == 2
            assert answer.estimated_rtt_ms == pytest.approx(2.0)

            # Nobody heartbeats: the leases run out, and both replicas' watchers see it.
            await next_topology(watch_a, lambda ids: not ids)
            await next_topology(watch_b, lambda ids: not ids)
            assert not (await b.stub.Heartbeat(geosteer_pb2.HeartbeatRequest(node_id="t1-1"))).known
            with redis.Redis.from_url(redis_instance.url) as client:
                keys = client.keys("voiceedge:geosteer:*")
                assert keys
                assert all(client.pttl(k) > 0 for k in keys), keys  # all expire
        finally:
            watch_a.cancel()
            watch_b.cancel()


@pytest.mark.timeout_s(45)
async def test_a_client_of_both_replicas_carries_on_when_one_stops(
    tmp_path: Path, redis_instance: Redis
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(replica(tmp_path, redis_instance.url))
        b = await stack.enter_async_context(replica(tmp_path, redis_instance.url))
        both = f"{a.address},{b.address}"
        loop = HeartbeatLoop.to_address(both, transceiver(1, 1))
        channel = geosteer_channel(both)
        stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        watch = b.stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
        try:
            loop.start()
            await asyncio.wait_for(loop.registered.wait(), TIMEOUT_S)
            await next_topology(watch, lambda ids: ids == {"t1-1"})
            routes = [await route(stub) for _ in range(4)]  # round robin: both answer
            assert {r.transceivers[0].node_id for r in routes} == {"t1-1"}

            await a.stop()
            # Every call after the stop lands on B; the loop's heartbeats go on there, so
            # the lease (2 s) never runs out while we watch for longer than that.
            for _ in range(10):
                assert (await route(stub)).transceivers[0].node_id == "t1-1"
            beats = loop.heartbeats
            for _ in range(300):  # bounded: 15 heartbeats at 200 ms come in about 3 s
                if loop.heartbeats >= beats + 15:
                    break
                await asyncio.sleep(0.05)
            assert loop.heartbeats >= beats + 15
            listed = (await b.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
            assert node_ids(listed) == {"t1-1"}
            assert loop.registrations == 1  # the record in Redis outlived replica A
        finally:
            watch.cancel()
            await loop.close()
            await channel.close(None)


@pytest.mark.timeout_s(45)
async def test_an_unreachable_registry_is_unavailable_then_recovers(
    tmp_path: Path, redis_instance: Redis
) -> None:
    async with replica(tmp_path, redis_instance.url) as a:
        await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(1, 1)))
        redis_instance.stop()
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(2, 2)))
        assert down.value.code() is grpc.StatusCode.UNAVAILABLE
        trailers: dict[str, Any] = dict(down.value.trailing_metadata() or ())  # type: ignore[arg-type]
        assert trailers.get("error-code") == "registry_unavailable"
        redis_instance.start()  # same port and append-only file: the first record is back
        await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(2, 2)))
        listed = (await a.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
        assert node_ids(listed) == {"t1-1", "t2-2"}


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("geosteer:50051", "geosteer:50051"),
        ("10.0.0.1:50051", "10.0.0.1:50051"),
        ("10.0.0.1:50051, 10.0.0.2:50052", "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
        ("[2001:db8::1]:50051,[2001:db8::2]:50051", "ipv6:[2001:db8::1]:50051,[2001:db8::2]:50051"),
    ],
)
def test_geosteer_targets(value: str, target: str) -> None:
    assert geosteer_target(value) == target


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("geosteer", "expected host:port"),
        ("10.0.0.1:50051,", "empty entry"),
        ("10.0.0.1:0", "port 0"),
        ("a.example:50051,b.example:50051", "must be IP literals"),
        ("10.0.0.1:50051,[2001:db8::1]:50051", "mixes IPv4 and IPv6"),
        ("10.0.0.1:99999", "out of range"),
    ],
)
def test_bad_geosteer_targets(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        geosteer_target(value)


def test_node_records_round_trip_and_garbage_is_refused() -> None:
    node = NodeState(
        node_id="t1-1",
        kind=NodeKind.TRANSCEIVER,
        cluster_id=1,
        expires_at=0.0,
        transceiver_id=1,
        grpc_address="10.0.0.5:50052",
        media_address=Endpoint("10.0.0.5", 40000),
        public_endpoints=(Endpoint("203.0.113.1", 3478), Endpoint("203.0.113.1", 443, True)),
        capacity_sessions=10,
        active_sessions=3,
        cpu_load=0.5,
        last_heartbeat_unix=1.7e9,
    )
    text = encode_node(node, 1.7e9 + 6)
    assert decode_node(text, lambda unix: unix - 1.7e9) == dataclasses.replace(node, expires_at=6.0)
    for garbage in ["", "[]", '{"id": "x"}', text.replace('"kind":2', '"kind":99')]:
        with pytest.raises(ValueError, match="bad node record"):
            decode_node(garbage, lambda unix: unix)
    for garbage in ["nope", '{"r": 3}', '{"o": "a", "s": [["p", "x", 1]]}']:
        with pytest.raises(ValueError, match="bad event"):
            decode_event(garbage)


@pytest.mark.timeout_s(30)
async def test_garbage_in_redis_is_counted_and_skipped(
    tmp_path: Path, redis_instance: Redis
) -> None:
    async with replica(tmp_path, redis_instance.url) as a:
        await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(1, 1)))
        with redis.Redis.from_url(redis_instance.url) as client:
            client.hset("voiceedge:geosteer:nodes", "junk", "not json")
            client.publish("voiceedge:geosteer:events", "not json either")
        listed = (await a.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
        assert node_ids(listed) == {"t1-1"}
        store = a.geosteer.directory.store
        assert isinstance(store, RedisNodeStore)
        assert store.bad_records >= 1
        await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=transceiver(2, 2)))
        listed = (await a.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
        assert node_ids(listed) == {"t1-1", "t2-2"}  # it carries on


class Blackhole:
    """A TCP relay to one address that can go silent: connections stay open, no byte
    passes (a replica whose host vanished without a reset)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.silent = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.silent.is_set():
                    await asyncio.Event().wait()  # swallow: until the test cancels it
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        if self._closed:  # a client reconnected while the test was tearing down
            up_writer.close()
            writer.close()
            return
        for task in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            self._tasks.add(asyncio.ensure_future(task))

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            self._closed = True
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()


@pytest.mark.timeout_s(45)
async def test_a_watch_on_a_replica_gone_silent_breaks_within_the_keepalive(
    tmp_path: Path, redis_instance: Redis
) -> None:
    async with replica(tmp_path, redis_instance.url) as a:
        hole = Blackhole(a.address)
        async with hole.serving() as address:
            channel = geosteer_channel(address)
            call = geosteer_pb2_grpc.GeosteerServiceStub(channel).WatchTopology(
                geosteer_pb2.WatchTopologyRequest()
            )
            try:
                assert isinstance(await asyncio.wait_for(call.read(), TIMEOUT_S), object)
                hole.silent.set()
                # Without keepalive this read would wait for TCP to give up (minutes); the
                # unanswered ping (10 s + 5 s) closes the connection and the stream fails,
                # so a follower reopens it on another replica.
                with pytest.raises(grpc.aio.AioRpcError) as broken:
                    await asyncio.wait_for(call.read(), 30)
                assert broken.value.code() is grpc.StatusCode.UNAVAILABLE
            finally:
                call.cancel()
                await channel.close(None)


@pytest.mark.timeout_s(45)
async def test_two_replicas_racing_for_one_transceiver_id_let_exactly_one_win(
    tmp_path: Path, redis_instance: Redis
) -> None:
    async with (
        replica(tmp_path, redis_instance.url) as a,
        replica(tmp_path, redis_instance.url) as b,
    ):
        for tid in range(1, 21):  # both at once through both replicas, 20 times
            first, second = transceiver(1, tid), transceiver(1, tid)
            first.node_id, second.node_id = f"a-{tid}", f"b-{tid}"
            results = await asyncio.gather(
                a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=first), timeout=5),
                b.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=second), timeout=5),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(refused) == 1, (tid, results)
            assert refused[0].code() is grpc.StatusCode.ALREADY_EXISTS, refused
            trailers: dict[str, Any] = dict(refused[0].trailing_metadata() or ())  # type: ignore[arg-type]
            assert trailers.get("error-code") == "transceiver_id_taken"
        listed = (await a.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
        ids = [n.transceiver_id for c in listed.clusters for n in c.nodes]
        assert len(ids) == len(set(ids)), ids  # never two live holders of one id

        # A holder that registers again under another id gives its old one up.
        moved = transceiver(2, 1)
        moved.node_id = "mover"
        await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=moved))
        moved.transceiver_id = 2
        await a.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=moved))
        taker = transceiver(2, 1)
        taker.node_id = "taker"
        await b.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=taker))
        again = transceiver(2, 2)
        again.node_id = "late"
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await b.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=again))
        assert taken.value.code() is grpc.StatusCode.ALREADY_EXISTS
