"""GeosteerService over real gRPC on 127.0.0.1:0, with an injected clock for leases; every
test runs on the in-memory registry and on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis

from libs.service.redis_testing import Redis, redis_server
from services.geosteer.client import HeartbeatLoop, NodeReport
from services.geosteer.geosteer_testing import (
    FRANKFURT_IP,
    SYDNEY_IP,
    TOPOLOGY,
    serve_geosteer,
    transceiver,
)
from services.geosteer.servicer import Geosteer
from services.geosteer.settings import GeosteerSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc


@pytest.fixture(scope="module")
def redis_instance() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def registry(request: pytest.FixtureRequest, redis_instance: Redis) -> str:
    """The redis_url setting: "" (this process's memory) or a flushed real Redis."""
    if request.param == "memory":
        return ""
    with redis.Redis.from_url(redis_instance.url) as client:
        client.flushall()
    return redis_instance.url


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    stub: geosteer_pb2_grpc.GeosteerServiceAsyncStub
    channel: grpc.aio.Channel
    clock: FakeClock
    geosteer: Geosteer


@asynccontextmanager
async def serve(tmp_path: Path, registry: str = "", **settings: object) -> AsyncIterator[Harness]:
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    clock = FakeClock()
    config = GeosteerSettings(
        grpc_listen="127.0.0.1:0",
        topology_path=str(path),
        heartbeat_interval_ms=100,
        heartbeat_ttl_ms=300,
        redis_url=registry,
        **settings,  # type: ignore[arg-type]
    )
    async with serve_geosteer(config, clock) as served:
        yield Harness(served.stub, served.channel, clock, served.geosteer)


async def register(
    stub: geosteer_pb2_grpc.GeosteerServiceAsyncStub, node: geosteer_pb2.Node
) -> None:
    response = await stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=node))
    assert (response.heartbeat_interval_ms, response.heartbeat_ttl_ms) == (100, 300)


async def beat(
    stub: geosteer_pb2_grpc.GeosteerServiceAsyncStub, node_id: str, **fields: object
) -> bool:
    request = geosteer_pb2.HeartbeatRequest(node_id=node_id, **fields)  # type: ignore[arg-type]
    return bool((await stub.Heartbeat(request)).known)


async def route(stub: geosteer_pb2_grpc.GeosteerServiceAsyncStub, ip: str) -> int:
    response = await stub.RouteSession(geosteer_pb2.RouteSessionRequest(client_ip=ip))
    return response.cluster.cluster_id


async def test_routes_spills_fails_over_and_learns(tmp_path: Path, registry: str) -> None:
    async with serve(tmp_path, registry) as h:
        for cluster_id in (1, 2, 3):
            await register(h.stub, transceiver(cluster_id, 1))

        response = await h.stub.RouteSession(
            geosteer_pb2.RouteSessionRequest(client_ip=FRANKFURT_IP)
        )
        assert response.cluster.cluster_id == 1
        assert response.cluster.healthy
        assert [(e.ip, e.port) for e in response.relay_endpoints] == [("203.0.113.1", 3478)]
        assert [t.node_id for t in response.transceivers] == ["t1-1"]
        assert response.transceivers[0].media_address.port == 7001
        assert response.client_region == "DE"
        assert 5.0 <= response.estimated_rtt_ms < 10.0
        assert await route(h.stub, SYDNEY_IP) == 3

        # Frankfurt's only transceiver is full: spill to Amsterdam.
        assert await beat(h.stub, "t1-1", active_sessions=1)
        assert await route(h.stub, FRANKFURT_IP) == 2
        # Draining: still no new sessions in Frankfurt.
        assert await beat(h.stub, "t1-1", active_sessions=0, draining=True)
        assert await route(h.stub, FRANKFURT_IP) == 2
        assert await beat(h.stub, "t1-1", active_sessions=0, draining=False)
        assert await route(h.stub, FRANKFURT_IP) == 1

        # Frankfurt stops heartbeating; the others keep going. After the TTL it is gone.
        h.clock.now += 0.2
        assert await beat(h.stub, "t2-1")
        assert await beat(h.stub, "t3-1")
        h.clock.now += 0.2
        assert await route(h.stub, FRANKFURT_IP) == 2
        assert not await beat(h.stub, "t1-1")  # it must register again
        await register(h.stub, transceiver(1, 1))
        assert await route(h.stub, FRANKFURT_IP) == 1

        # Amsterdam's transceiver measures Frankfurt's clients at 2 ms: steering follows.
        sample = geosteer_pb2.RttSample(client_prefix="194.25.0.0/24", rtt_ms=2.0, sample_count=4)
        assert await beat(h.stub, "t2-1", rtt_samples=[sample])
        response = await h.stub.RouteSession(
            geosteer_pb2.RouteSessionRequest(client_ip=FRANKFURT_IP)
        )
        assert response.cluster.cluster_id == 2
        assert response.estimated_rtt_ms == pytest.approx(2.0)
        # Garbage samples are counted drops, not errors.
        bad = geosteer_pb2.RttSample(client_prefix="nonsense", rtt_ms=1.0, sample_count=1)
        assert await beat(h.stub, "t2-1", rtt_samples=[bad])
        assert h.geosteer.directory.rtt_samples_dropped == 1


async def test_errors_and_unknown_nodes(tmp_path: Path, registry: str) -> None:
    async with serve(tmp_path, registry) as h:
        assert not await beat(h.stub, "never-registered")
        removed = await h.stub.DeregisterNode(geosteer_pb2.DeregisterNodeRequest(node_id="x"))
        assert not removed.removed

        with pytest.raises(grpc.aio.AioRpcError) as no_route:
            await route(h.stub, FRANKFURT_IP)
        assert no_route.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no healthy cluster" in (no_route.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as bad_ip:
            await route(h.stub, "not-an-ip")
        assert bad_ip.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        for node, message in [
            (geosteer_pb2.Node(kind=common_pb2.NODE_KIND_RELAY), "node_id"),
            (geosteer_pb2.Node(node_id="n"), "node.kind: required"),
            (
                geosteer_pb2.Node(node_id="t", kind=common_pb2.NODE_KIND_TRANSCEIVER),
                "media_address",
            ),
            (geosteer_pb2.Node(node_id="r", kind=common_pb2.NODE_KIND_RELAY), "public_endpoints"),
            (transceiver(9, 1), "unknown cluster_id 9"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await h.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=node))
            assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in (invalid.value.details() or "")

        await register(h.stub, transceiver(1, 1))
        clash = transceiver(1, 1)
        clash.node_id = "impostor"
        with pytest.raises(grpc.aio.AioRpcError) as exists:
            await h.stub.RegisterNode(geosteer_pb2.RegisterNodeRequest(node=clash))
        assert exists.value.code() is grpc.StatusCode.ALREADY_EXISTS

        # A relay announces a second VIP for cluster 1.
        relay = geosteer_pb2.Node(
            node_id="r1",
            kind=common_pb2.NODE_KIND_RELAY,
            cluster_id=1,
            public_endpoints=[common_pb2.SocketAddress(ip="203.0.113.9", port=3478)],
        )
        await register(h.stub, relay)
        topology = (await h.stub.ListTopology(geosteer_pb2.ListTopologyRequest())).topology
        fra = topology.clusters[0]
        assert [c.cluster_id for c in topology.clusters] == [1, 2, 3]
        assert [n.node_id for n in fra.nodes] == ["r1", "t1-1"]
        assert [e.ip for e in fra.relay_endpoints] == ["203.0.113.1", "203.0.113.9"]
        assert (fra.healthy, fra.capacity_sessions) == (True, 1)
        assert not topology.clusters[1].healthy
        assert fra.nodes[1].last_heartbeat_at.seconds > 0

        removed = await h.stub.DeregisterNode(geosteer_pb2.DeregisterNodeRequest(node_id="r1"))
        assert removed.removed


async def test_watch_sees_registration_and_expiry(tmp_path: Path, registry: str) -> None:
    async with serve(tmp_path, registry) as h:
        call = h.stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
        try:
            first = await asyncio.wait_for(call.read(), 10)
            assert isinstance(first, geosteer_pb2.WatchTopologyResponse)
            assert first.revision == first.topology.revision
            assert all(not c.nodes for c in first.topology.clusters)

            await register(h.stub, transceiver(3, 7))
            update = await asyncio.wait_for(call.read(), 10)
            assert isinstance(update, geosteer_pb2.WatchTopologyResponse)
            assert update.revision > first.revision
            assert [n.node_id for n in update.topology.clusters[2].nodes] == ["t3-7"]

            # Expiry is pushed by the periodic sweep, with no RPC to trigger it.
            h.clock.now += 1.0
            gone = await asyncio.wait_for(call.read(), 10)
            assert isinstance(gone, geosteer_pb2.WatchTopologyResponse)
            assert gone.revision > update.revision
            assert not gone.topology.clusters[2].nodes
        finally:
            call.cancel()


async def test_heartbeat_loop_registers_and_recovers(tmp_path: Path, registry: str) -> None:
    async with serve(tmp_path, registry) as h:
        call = h.stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
        load = NodeReport(active_sessions=0)
        loop = HeartbeatLoop(h.channel, transceiver(2, 4, capacity=8), lambda: load)

        async def until(predicate: object) -> geosteer_pb2.Topology:
            for _ in range(50):
                message = await asyncio.wait_for(call.read(), 10)
                assert isinstance(message, geosteer_pb2.WatchTopologyResponse)
                if predicate(message.topology):  # type: ignore[operator]
                    return message.topology
            raise AssertionError("topology never reached the expected state")

        def has_node(t: geosteer_pb2.Topology) -> bool:
            return any(n.node_id == "t2-4" for n in t.clusters[1].nodes)

        try:
            loop.start()
            await until(has_node)
            assert loop.interval_s == pytest.approx(0.1)
            # Geosteer forgets the node (as after a restart): the loop registers again.
            await h.stub.DeregisterNode(geosteer_pb2.DeregisterNodeRequest(node_id="t2-4"))
            await until(lambda t: not has_node(t))
            await until(has_node)
            # The watch can see the node before the loop has read RegisterNode's answer.
            await asyncio.wait_for(loop.registered.wait(), 10)
            assert loop.registrations >= 2
            await loop.close()
            await until(lambda t: not has_node(t))
        finally:
            await loop.close()
            call.cancel()
