"""Test kit: a geosteer (directory, servicer) on a real gRPC server on 127.0.0.1:0, the test
topology and node records, for grpc_test and replicas_test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc.aio

from libs.service.runtime import GrpcService, Servicer
from services.geosteer.servicer import Geosteer
from services.geosteer.settings import GeosteerSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

TOPOLOGY = """
[[clusters]]
id = 1
name = "fra-1"
region = "eu-central"
latitude = 50.11
longitude = 8.68
relay_vips = ["203.0.113.1:3478"]

[[clusters]]
id = 2
name = "ams-1"
region = "eu-west"
latitude = 52.37
longitude = 4.90
relay_vips = ["203.0.113.2:3478"]

[[clusters]]
id = 3
name = "syd-1"
region = "apac"
latitude = -33.87
longitude = 151.21
relay_vips = ["203.0.113.3:3478"]
"""

FRANKFURT_IP = "194.25.0.1"  # the bundled DB-IP Lite places it in Frankfurt am Main
SYDNEY_IP = "1.1.1.1"  # ... and this one in Sydney


@dataclass
class Served:
    geosteer: Geosteer
    service: GrpcService
    channel: grpc.aio.Channel
    stub: geosteer_pb2_grpc.GeosteerServiceAsyncStub

    @property
    def address(self) -> str:
        return self.service.address

    async def stop(self) -> None:
        """The replica goes away: its streams end, its port closes (idempotent)."""
        await self.geosteer.close()
        await self.service.close(0.0)


@asynccontextmanager
async def serve_geosteer(
    settings: GeosteerSettings, clock: Callable[[], float] | None = None
) -> AsyncIterator[Served]:
    """`settings` (grpc_listen is ignored: a free port) served until the block ends."""
    geosteer = Geosteer(settings, clock=clock)
    geosteer.start()
    name = geosteer_pb2.DESCRIPTOR.services_by_name["GeosteerService"].full_name
    add = geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server
    service = GrpcService("geosteer", "127.0.0.1:0", [Servicer(name, add, geosteer.servicer)])
    await service.start()
    channel = grpc.aio.insecure_channel(service.address)
    try:
        yield Served(geosteer, service, channel, geosteer_pb2_grpc.GeosteerServiceStub(channel))
    finally:
        # Geosteer first: its watch streams end cleanly before the server stops.
        await geosteer.close()
        await service.close(1.0)
        await channel.close(None)


def transceiver(cluster_id: int, tid: int, capacity: int = 1) -> geosteer_pb2.Node:
    return geosteer_pb2.Node(
        node_id=f"t{cluster_id}-{tid}",
        kind=common_pb2.NODE_KIND_TRANSCEIVER,
        cluster_id=cluster_id,
        transceiver_id=tid,
        grpc_address=f"127.0.0.1:{6000 + cluster_id}",
        media_address=common_pb2.SocketAddress(ip="127.0.0.1", port=7000 + cluster_id),
        capacity_sessions=capacity,
    )
