"""No single point of failure in the control plane, with real processes on one real Redis.

- Two geosteer replicas share the registry; every other service is given both addresses. One
  replica is killed (kill -9, by PID): new calls are routed through the other, the
  transceiver's heartbeats go on there, and the relay's WatchTopology stream moves to it (a
  transceiver that registers after the kill reaches the relay's topology). Then the first
  comes back and the second is killed, so whichever replica held a stream, it moved once.
- Two signaling replicas behind one address (a round-robin TCP proxy standing in for a
  Kubernetes Service): a call created through one is read and ended through the other;
  one is killed and the other keeps serving the same address.

Figures (kill to the first new call connected, ...) are printed, not asserted
(RELIABILITY.md records them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import grpc
import pytest
from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult, run_call
from libs.service.redis_testing import redis_server
from tests.e2e.edge import caller_closed, edge, wait_for
from tools.demo.stack import Stack
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

API_KEY = "sk-e2e-replicas-0123456789"
# Short timers so a lost heartbeat would show within seconds (production: 2 s / 6 s).
GEOSTEER_FLAGS = ["--heartbeat-interval-ms", "500", "--heartbeat-ttl-ms", "2000"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    with (
        redis_server() as redis,
        edge(
            workdir,
            API_KEY,
            redis_url=redis.url,
            extra_flags={"geosteer": GEOSTEER_FLAGS},
            geosteer_replicas=2,
        ) as running,
    ):
        yield running


def topology(stack: Stack, replica: str) -> geosteer_pb2.Topology:
    with grpc.insecure_channel(stack.grpc(replica)) as channel:
        stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        return stub.ListTopology(geosteer_pb2.ListTopologyRequest(), timeout=5).topology


def heartbeat_at(stack: Stack, replica: str, node_id: str) -> float:
    """When `replica` last heard `node_id` (Unix seconds; 0: it does not hold the node)."""
    for cluster in topology(stack, replica).clusters:
        for node in cluster.nodes:
            if node.node_id == node_id:
                return float(node.last_heartbeat_at.ToNanoseconds()) / 1e9
    return 0.0


def relay_transceivers(stack: Stack) -> int:
    with grpc.insecure_channel(stack.grpc("relay")) as channel:
        stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
        return stub.GetStats(relay_pb2.GetStatsRequest(), timeout=5).stats.topology_transceivers


@pytest.mark.timeout_s(150)
async def test_killing_one_geosteer_replica_leaves_routing_heartbeats_and_watches(
    stack: Stack,
) -> None:
    assert (await run_call(stack.http_base, API_KEY, seconds=0.3)).connected
    assert await asyncio.to_thread(relay_transceivers, stack) == 1
    # Both replicas hold the one registration, whichever replica it went through.
    for replica in ("geosteer", "geosteer-2"):
        assert await asyncio.to_thread(heartbeat_at, stack, replica, "transceiver-1-1") > 0

    killed_at = time.time()
    start = time.monotonic()
    stack.kill("geosteer")  # SIGKILL by PID (a process start_stack started)
    call = await run_call(stack.http_base, API_KEY, seconds=0.3)
    assert call.connected, call.error_body
    first_call_s = call.times["connected"] - start

    await wait_for(
        "the transceiver's heartbeats to reach the surviving replica",
        lambda: heartbeat_at(stack, "geosteer-2", "transceiver-1-1") > killed_at,
        20,
    )
    heartbeat_s = heartbeat_at(stack, "geosteer-2", "transceiver-1-1") - killed_at
    # ... and keep coming: the lease (2 s) is renewed past several of its lengths.
    await wait_for(
        "heartbeats to go on past the lease",
        lambda: heartbeat_at(stack, "geosteer-2", "transceiver-1-1") > killed_at + 5.0,
        20,
    )
    assert await asyncio.to_thread(relay_transceivers, stack) == 1

    # A transceiver that starts after the kill registers through the survivor, and the
    # relay (its WatchTopology stream reopened there) learns it.
    flags = [*stack.services["transceiver"].flags, "--transceiver-id", "2"]
    assert stack.launcher is not None
    await asyncio.to_thread(stack.launcher, "transceiver-2", flags, 0)
    joined = time.monotonic()
    await wait_for(
        "the relay to learn the new transceiver", lambda: relay_transceivers(stack) == 2, 20
    )
    relay_learned_s = time.monotonic() - joined
    for _ in range(2):  # calls go on, whichever transceiver takes them
        assert (await run_call(stack.http_base, API_KEY, seconds=0.3)).connected

    # The first replica comes back on its address and the second is killed, so a stream
    # that the first kill did not move (it was on the second replica) moves now.
    await asyncio.to_thread(stack.restart, "geosteer")
    stack.kill("geosteer-2")
    flags = [*stack.services["transceiver"].flags, "--transceiver-id", "3"]
    await asyncio.to_thread(stack.launcher, "transceiver-3", flags, 0)
    joined = time.monotonic()
    await wait_for(
        "the relay to learn the third transceiver", lambda: relay_transceivers(stack) == 3, 20
    )
    relay_learned_again_s = time.monotonic() - joined
    assert (await run_call(stack.http_base, API_KEY, seconds=0.3)).connected
    print(
        f"geosteer replica kill -9: first new call connected {first_call_s * 1000:.0f} ms "
        f"after the kill; first transceiver heartbeat on the survivor {heartbeat_s * 1000:.0f} ms "
        "after it; "
        f"a transceiver started after the kill in the relay's topology "
        f"{relay_learned_s * 1000:.0f} ms after it was ready; after the first replica's "
        f"restart and the second's kill, a third in {relay_learned_again_s * 1000:.0f} ms"
    )
    assert stack.check_alive() == "geosteer-2 exited with -9"


class RoundRobinProxy:
    """A TCP listener that hands each new connection to the next backend that accepts it
    (as a Kubernetes Service does across ready pods), byte for byte."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self._turn = itertools.cycle(range(len(backends)))
        self.served: list[int] = []  # which backend took each connection
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(len(self.backends)):  # bounded: each backend once
            index = next(self._turn)
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    *self.backends[index]
                )
            except OSError:
                continue  # that backend is gone: the next one
            self.served.append(index)
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
            return
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            await server.wait_closed()


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@dataclass
class Seen:
    """What the signaling test saw during its call."""

    get_other: tuple[int, bool] = (0, False)  # GET through the next replica: status, other?
    after_kill: list[int] = field(default_factory=list)  # GET statuses after the kill
    delete: int = 0
    closed: bool = False
    survivor: int = -1


@pytest.mark.timeout_s(120)
async def test_two_signaling_replicas_behind_one_address_share_calls(stack: Stack) -> None:
    assert stack.launcher is not None
    await asyncio.to_thread(
        stack.launcher, "signaling-2", list(stack.services["signaling"].flags), 0
    )
    names = ["signaling", "signaling-2"]
    proxy = RoundRobinProxy([host_port(str(stack.services[n].ready["http"])) for n in names])
    headers = {"Authorization": f"Bearer {API_KEY}"}
    seen = Seen()

    async def during(pc: RTCPeerConnection, result: CallResult) -> None:
        url = base + result.call_url if result.call_url.startswith("/") else result.call_url
        creator = proxy.served[0]  # the POST's connection
        # One connection per request, so each is the proxy's next pick.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(url, headers=headers) as response:
                seen.get_other = (response.status, proxy.served[-1] != creator)
            stack.kill(names[creator])  # SIGKILL by PID: the replica that created the call
            for _ in range(3):
                async with http.get(url, headers=headers) as response:
                    seen.after_kill.append(response.status)
            async with http.delete(url, headers=headers) as response:
                seen.delete = response.status
        seen.closed = await caller_closed(pc, 15)
        seen.survivor = 1 - creator

    async with proxy.serving() as base:
        call = await run_call(base, API_KEY, during=during)
        assert call.connected, call.error_body
        assert seen.get_other == (200, True), seen
        assert seen.after_kill == [200, 200, 200], seen
        assert seen.delete in (200, 204), seen
        assert seen.closed, seen  # the survivor's DELETE ended the session
        # New calls go on through the one address, on the survivor.
        before = len(proxy.served)
        assert (await run_call(base, API_KEY, seconds=0.3)).connected
        assert set(proxy.served[before:]) == {seen.survivor}
