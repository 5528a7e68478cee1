"""The transceiver's geosteer registration (services/geosteer/client.HeartbeatLoop) against
a real in-test GeosteerService on 127.0.0.1:0: what it reports, re-registration, draining
reported at once, deregistration."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc.aio

from services.geosteer.client import HeartbeatLoop, NodeReport, ProcessCpuMeter
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc


class FakeGeosteer(geosteer_pb2_grpc.GeosteerServiceServicer):
    def __init__(self) -> None:
        self.registered: list[geosteer_pb2.Node] = []
        self.heartbeats: asyncio.Queue[geosteer_pb2.HeartbeatRequest] = asyncio.Queue()
        self.deregistered: list[str] = []
        self.forget_next = False

    async def RegisterNode(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.RegisterNodeRequest, context: Any
    ) -> geosteer_pb2.RegisterNodeResponse:
        self.registered.append(request.node)
        return geosteer_pb2.RegisterNodeResponse(heartbeat_interval_ms=20, heartbeat_ttl_ms=100)

    async def Heartbeat(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.HeartbeatRequest, context: Any
    ) -> geosteer_pb2.HeartbeatResponse:
        self.heartbeats.put_nowait(request)
        known, self.forget_next = not self.forget_next, False
        return geosteer_pb2.HeartbeatResponse(known=known)

    async def DeregisterNode(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.DeregisterNodeRequest, context: Any
    ) -> geosteer_pb2.DeregisterNodeResponse:
        self.deregistered.append(request.node_id)
        return geosteer_pb2.DeregisterNodeResponse(removed=True)


async def test_registers_heartbeats_reregisters_and_deregisters() -> None:
    geosteer = FakeGeosteer()  # type: ignore[abstract]  # only the node RPCs
    server = grpc.aio.server()
    geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server(geosteer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    load = NodeReport(active_sessions=3, capacity_sessions=200, draining=False)
    cpu = ProcessCpuMeter()
    node = geosteer_pb2.Node(
        node_id="tx-1",
        kind=common_pb2.NODE_KIND_TRANSCEIVER,
        cluster_id=7,
        transceiver_id=42,
        grpc_address="127.0.0.1:50052",
        media_address=common_pb2.SocketAddress(ip="127.0.0.1", port=40000),
        capacity_sessions=200,
    )
    reporter = HeartbeatLoop.to_address(
        f"127.0.0.1:{port}",
        node,
        lambda: NodeReport(
            load.active_sessions, load.capacity_sessions, load.draining, cpu_load=cpu.read()
        ),
    )
    try:
        reporter.start()
        async with asyncio.timeout(5):
            beat = await geosteer.heartbeats.get()
        (registered,) = geosteer.registered
        assert registered.kind == common_pb2.NODE_KIND_TRANSCEIVER
        assert (registered.cluster_id, registered.transceiver_id) == (7, 42)
        assert registered.media_address.port == 40000
        assert registered.active_sessions == 3
        assert (beat.node_id, beat.active_sessions, beat.capacity_sessions) == ("tx-1", 3, 200)
        assert not beat.draining
        assert 0.0 <= beat.cpu_load <= 1.0

        # Geosteer forgot the node: the next round registers again.
        geosteer.forget_next = True
        async with asyncio.timeout(5):
            while len(geosteer.registered) < 2:
                await geosteer.heartbeats.get()

        # Draining is reported at once when poked.
        load = NodeReport(active_sessions=1, capacity_sessions=200, draining=True)
        reporter.poke()
        async with asyncio.timeout(5):
            while not (await geosteer.heartbeats.get()).draining:
                pass
    finally:
        await reporter.close()
        await server.stop(0)
    assert geosteer.deregistered == ["tx-1"]
