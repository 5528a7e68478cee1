"""Runs inside the network namespace of deploy/images_test.py's containers (via nsenter): what
the test needs to see from there, as one JSON line on stdout.

    python images_probe.py refused GEOSTEER TRANSCEIVER RELAY
        every protected RPC without the token: its status code names
    python images_probe.py registered GEOSTEER
        waits (bounded) until a transceiver has registered with geosteer (with the token)

The token comes from VOICEEDGE_INTERNAL_TOKEN, as in every voiceedge process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from typing import Any

import grpc
import grpc.aio

from libs.service.auth import internal_channel
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

REGISTER_TIMEOUT_S = 60.0
POLL_S = 0.5


async def refused(geosteer: str, transceiver: str, relay: str) -> dict[str, str]:
    """Each protected RPC, called with no token at all: what the real server answered."""
    codes: dict[str, str] = {}
    async with (
        grpc.aio.insecure_channel(geosteer) as g,
        grpc.aio.insecure_channel(transceiver) as t,
        grpc.aio.insecure_channel(relay) as r,
    ):
        calls: dict[str, Awaitable[Any]] = {
            "RegisterNode": geosteer_pb2_grpc.GeosteerServiceStub(g).RegisterNode(
                geosteer_pb2.RegisterNodeRequest(), timeout=5
            ),
            "DeregisterNode": geosteer_pb2_grpc.GeosteerServiceStub(g).DeregisterNode(
                geosteer_pb2.DeregisterNodeRequest(), timeout=5
            ),
            "CreateSession": transceiver_pb2_grpc.TransceiverServiceStub(t).CreateSession(
                transceiver_pb2.CreateSessionRequest(), timeout=5
            ),
            "Drain(transceiver)": transceiver_pb2_grpc.TransceiverServiceStub(t).Drain(
                transceiver_pb2.DrainRequest(), timeout=5
            ),
            "Drain(relay)": relay_pb2_grpc.RelayAdminServiceStub(r).Drain(
                relay_pb2.DrainRequest(), timeout=5
            ),
            "ListBindings": relay_pb2_grpc.RelayAdminServiceStub(r).ListBindings(
                relay_pb2.ListBindingsRequest(), timeout=5
            ),
        }
        for name, call in calls.items():
            try:
                await call
                codes[name] = "OK"
            except grpc.aio.AioRpcError as exc:
                codes[name] = exc.code().name
    return codes


async def registered(geosteer: str) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REGISTER_TIMEOUT_S
    async with internal_channel(geosteer) as channel:
        stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        while loop.time() < deadline:
            reply = await stub.ListTopology(geosteer_pb2.ListTopologyRequest(), timeout=5)
            if any(
                node.kind == common_pb2.NODE_KIND_TRANSCEIVER and not node.draining
                for cluster in reply.topology.clusters
                for node in cluster.nodes
            ):
                return True
            await asyncio.sleep(POLL_S)  # heartbeats are periodic: nothing to await but time
    return False


def main(argv: list[str]) -> int:
    command, *addresses = argv
    if command == "refused":
        result: object = asyncio.run(refused(*addresses))
    elif command == "registered":
        result = asyncio.run(registered(*addresses))
    else:
        print(f"images_probe: unknown command {command!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
