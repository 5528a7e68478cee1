"""NodeWatch over real gRPC: a transceiver that leaves the topology is reported once; the
first snapshot of every stream (a restarted geosteer's empty one too) ends nobody's call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest

from services.signaling.nodewatch import NodeWatch, lost, transceivers
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

Snapshot = geosteer_pb2.WatchTopologyResponse


def _snapshot(*node_ids: str) -> Snapshot:
    nodes = [geosteer_pb2.Node(node_id=n, kind=common_pb2.NODE_KIND_TRANSCEIVER) for n in node_ids]
    relay = geosteer_pb2.Node(node_id="relay-1", kind=common_pb2.NODE_KIND_RELAY)
    cluster = geosteer_pb2.Cluster(cluster_id=1, nodes=[*nodes, relay])
    return Snapshot(topology=geosteer_pb2.Topology(clusters=[cluster]))


def test_lost_is_what_left_and_nothing_without_a_baseline() -> None:
    assert transceivers(_snapshot("a", "b").topology) == {"a", "b"}
    assert lost(None, frozenset()) == []
    assert lost(frozenset({"a", "b"}), frozenset({"b", "c"})) == ["a"]


class _Geosteer(geosteer_pb2_grpc.GeosteerServiceServicer):
    """Each WatchTopology stream sends what is put in `streams[i]` (None: end it)."""

    def __init__(self) -> None:
        self.streams: list[asyncio.Queue[Snapshot | None]] = [asyncio.Queue(), asyncio.Queue()]
        self.opened = 0

    async def WatchTopology(  # noqa: N802 (gRPC method name)
        self, request: Any, context: Any
    ) -> AsyncIterator[Snapshot]:
        queue = self.streams[self.opened]
        self.opened += 1
        while (item := await queue.get()) is not None:
            yield item


@pytest.mark.timeout_s(30)
async def test_watch_reports_lost_transceivers_across_a_broken_stream() -> None:
    geosteer = _Geosteer()  # type: ignore[abstract]  # serves WatchTopology only
    server = grpc.aio.server()
    geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server(geosteer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    reported: asyncio.Queue[str] = asyncio.Queue()

    async def on_lost(node_id: str) -> int:
        reported.put_nowait(node_id)
        return 0

    watch = NodeWatch(geosteer_pb2_grpc.GeosteerServiceStub(channel), on_lost, retry_s=0.05)
    watch.start()
    try:
        first, second = geosteer.streams
        for snapshot in (_snapshot("a", "b"), _snapshot("b"), None):
            first.put_nowait(snapshot)
        async with asyncio.timeout(10):
            assert await reported.get() == "a"
        # The stream broke; the new one starts empty (geosteer restarted): no one is lost.
        for snapshot in (_snapshot(), _snapshot("b"), _snapshot()):
            second.put_nowait(snapshot)
        async with asyncio.timeout(10):
            assert await reported.get() == "b"
        assert reported.empty()
    finally:
        await watch.close()
        await channel.close(None)
        await server.stop(0)
