"""The edge on a world of regions (tools/netsim/world.py): one relay per region on its VIP,
one transceiver per full region, the control plane (geosteer, bridge, signaling) on one
host, client hosts around the world, and what the region tests and the benchmark ask of
it: place a call from a client, probe every VIP from it, ask geosteer where it would send
a client, kill a region's transceivers.

Geosteer locates clients through a City mmdb written for their test addresses
(services/geosteer/mmdb_testing.py) with `geoip_locate_private`, so it steers by the
simulated cities as it would by a real database. Every service is the Bazel binary
started with `ip netns exec` (tools/demo/stack.launch_process); `world_edge` tears
everything down on exit, also after an exception (the Testbed context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult, run_call
from libs.wire import ufrag
from services.geosteer.mmdb_testing import CityRecord, write_city_mmdb
from tools.demo.stack import Service, _binary, launch_process, stop_processes
from tools.netsim import layout, net, probe
from tools.netsim.mesh import MeshLinks
from tools.netsim.world import (
    CONTROL,
    RELAY_PORT,
    Client,
    Region,
    World,
    layout_text,
    link_delays,
    topology_toml,
    within,
)
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

ECHO_PORT = 7  # UDP echo on every VIP, for the clients' first-hop probes
HTTP_PORT = 8080
REGISTER_TIMEOUT_S = 60.0
NODE_KIND_RELAY = 1
NODE_KIND_TRANSCEIVER = 2


@dataclass(frozen=True)
class Timers:
    """Heartbeats and RTT reports, short so a test sees failover and learning quickly."""

    heartbeat_interval_ms: int = 500
    heartbeat_ttl_ms: int = 1500
    rtt_report_interval_s: float = 1.0
    rtt_max_age_s: float = 600.0
    max_sessions: int = 50


@dataclass
class RegionsEdge:
    world: World
    testbed: net.Testbed
    timers: Timers
    services: dict[str, Service] = field(default_factory=dict)
    api_key: str = ""
    echoes: list[probe.EchoServer] = field(default_factory=list)
    mesh: MeshLinks | None = None

    @property
    def http_base(self) -> str:
        return f"http://{self.services['signaling'].ready['http']}"

    @property
    def geosteer(self) -> str:
        return str(self.services["geosteer"].ready["grpc"])

    # -- questions to geosteer, asked from the control host ---------------------------

    def _geosteer(self, call: Callable[[geosteer_pb2_grpc.GeosteerServiceStub], Any]) -> Any:
        with self.testbed.entered("ctl"), grpc.insecure_channel(self.geosteer) as channel:
            return call(geosteer_pb2_grpc.GeosteerServiceStub(channel))

    def topology(self) -> geosteer_pb2.Topology:
        topology: geosteer_pb2.Topology = self._geosteer(
            lambda s: s.ListTopology(geosteer_pb2.ListTopologyRequest(), timeout=5).topology
        )
        return topology

    def route(self, client: Client, prefer: int | None = None) -> geosteer_pb2.RouteSessionResponse:
        """What geosteer answers for `client` now (RouteSession has no side effects)."""
        request = geosteer_pb2.RouteSessionRequest(client_ip=client.address)
        if prefer is not None:
            request.hints.preferred_cluster_id = prefer
        response: geosteer_pb2.RouteSessionResponse = self._geosteer(
            lambda s: s.RouteSession(request, timeout=5)
        )
        return response

    def measured(self, client: Client, cluster_id: int, *, area: bool = False) -> bool | None:
        """Whether geosteer holds an RTT measured for client's prefix in cluster_id (with
        `area`: or by its area's other prefixes); None when it cannot tell: a full cluster
        is never chosen, even when preferred, so its answer says nothing about that
        cluster's RTT until a session ends."""
        answer = self.route(client, prefer=cluster_id)
        if answer.cluster.cluster_id != cluster_id:
            return None
        if area:
            return bool(answer.estimated_rtt_measured)
        return answer.estimated_rtt_measured and not answer.estimated_rtt_nearby

    def session_rtt_ms(self, region: Region, session_id: str) -> float:
        """The first-hop RTT the region's transceiver holds for one session (0.0 before
        it has one, or when the transceiver does not answer): what its next RTT report to
        geosteer carries."""
        address = str(self.services[f"transceiver{region.cluster_id}"].ready["grpc"])
        request = transceiver_pb2.GetSessionRequest(session_id=session_id)
        with self.testbed.entered("ctl"), grpc.insecure_channel(address) as channel:
            stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)
            try:
                info = stub.GetSession(request, timeout=5).session
            except grpc.RpcError:
                return 0.0
        return float(info.stats.min_rtt_ms)

    def last_heartbeat_unix(self, cluster_id: int) -> float:
        """When geosteer last heard the cluster's transceiver (its own wall clock)."""
        for cluster in self.topology().clusters:
            if cluster.cluster_id == cluster_id:
                return max(
                    (
                        n.last_heartbeat_at.ToMicroseconds() / 1e6
                        for n in cluster.nodes
                        if n.kind == NODE_KIND_TRANSCEIVER
                    ),
                    default=0.0,
                )
        return 0.0

    def offered(self) -> dict[int, tuple[int, int]]:
        """cluster id -> (live relays, live non-draining transceivers)."""
        found = {}
        for cluster in self.topology().clusters:
            relays = sum(n.kind == NODE_KIND_RELAY for n in cluster.nodes)
            trx = sum(n.kind == NODE_KIND_TRANSCEIVER and not n.draining for n in cluster.nodes)
            found[cluster.cluster_id] = (relays, trx)
        return found

    # -- what a client does ------------------------------------------------------------

    def probe_ms(self, client: Client, region: Region, count: int = 5) -> float:
        """The client's first-hop RTT to region's VIP: the least of `count` UDP echoes
        50 ms apart. The least, as the transceivers report: on a loaded host the delay
        links' and the echo's scheduling lag adds to a round trip and never takes from it
        (a median of 5 echoes 20 ms apart put a 72 ms Seoul to Singapore hop at 265 ms
        under a load average of 21)."""
        with self.testbed.entered(client.host):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            samples = probe.probe(
                sock, (region.vip, ECHO_PORT), count=count, interval_s=0.05, timeout_s=2.0
            )
        summary = probe.summarise(samples)
        if summary.received == 0:
            raise RuntimeError(f"no echo from {region.name}'s VIP to {client.name}")
        return summary.rtt_min_ms

    def call(
        self,
        client: Client,
        during: Callable[[RTCPeerConnection, CallResult], Awaitable[None]] | None = None,
        *,
        seconds: float = 1.0,
        connect_timeout_s: float = 30.0,
    ) -> CallResult:
        """An aiortc call from `client`'s host (blocking: its own thread and event loop, so
        several clients can call at once, each thread in its own namespace)."""
        with self.testbed.entered(client.host):
            return asyncio.run(
                run_call(
                    self.http_base,
                    self.api_key,
                    seconds=seconds,
                    during=during,
                    connect_timeout_s=connect_timeout_s,
                )
            )

    def set_bad_routes(self, bad_routes: dict[tuple[str, str], float]) -> None:
        """The routes change while everything runs: these (city, region) pairs are bad from
        now on, every other pair takes its distance again."""
        assert self.mesh is not None
        self.world = dataclasses.replace(self.world, bad_routes=dict(bad_routes))
        self.mesh.set_delays(link_delays(self.world))

    def kill_transceivers(self, region: Region) -> float:
        """SIGKILL of the region's transceiver (by PID, ours); returns the monotonic time."""
        process = self.services[f"transceiver{region.cluster_id}"].process
        process.kill()
        killed = time.monotonic()
        process.wait(timeout=10)
        return killed


def cluster_of(result: CallResult) -> int:
    """The cluster the call's transceiver is in, from the ufrag in the answer (the dev
    keyring: the world edge configures none)."""
    for line in result.answer_sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            token = ufrag.decode(line.split(":", 1)[1].strip(), ufrag.dev_keyring())
            return token.cluster_id
    raise ValueError("no a=ice-ufrag in the answer")


def candidates(sdp: str) -> list[str]:
    """The addresses an SDP's candidates offer, in order, each once (every m-section
    repeats them)."""
    found: list[str] = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:") and line.split()[4] not in found:
            found.append(line.split()[4])
    return found


def _mmdb_records(world: World) -> list[CityRecord]:
    return [
        CityRecord(c.network, c.city.location.latitude, c.city.location.longitude)
        for c in world.clients
    ]


class _Launcher:
    def __init__(self, edge: RegionsEdge, env: dict[str, str], log: TextIO) -> None:
        self.edge, self.env, self.log = edge, env, log

    def __call__(self, name: str, binary: str, host: str, address: str, *flags: str) -> Service:
        command = [
            "ip",
            "netns",
            "exec",
            self.edge.testbed.ns(host),
            _binary(binary),
            "--grpc-listen",
            f"{address}:0",
            "--drain-grace-s",
            "1",
            *flags,
        ]
        process, ready = launch_process(name, command, self.env, self.log)
        service = Service(name, process, ready, list(flags))
        self.edge.services[name] = service
        return service


def _wait_registered(edge: RegionsEdge) -> None:
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    want = {r.cluster_id: (1, 1 if r.transceivers else 0) for r in edge.world.regions}
    while time.monotonic() < deadline:
        if edge.offered() == want:
            return
        time.sleep(0.1)
    raise RuntimeError(f"regions not registered in time: {edge.offered()} != {want}")


def _start_services(edge: RegionsEdge, launch: _Launcher, workdir: Path) -> None:
    world, timers = edge.world, edge.timers
    topology = workdir / "regions.toml"
    topology.write_text(topology_toml(world))
    mmdb = write_city_mmdb(workdir / "clients.mmdb", _mmdb_records(world))
    geosteer = launch(
        "geosteer",
        "geosteer",
        "ctl",
        CONTROL,
        "--topology-path",
        str(topology),
        "--geoip-db-path",
        str(mmdb),
        "--geoip-locate-private",
        "true",
        "--heartbeat-interval-ms",
        str(timers.heartbeat_interval_ms),
        "--heartbeat-ttl-ms",
        str(timers.heartbeat_ttl_ms),
        "--rtt-max-age-s",
        str(timers.rtt_max_age_s),
    ).ready["grpc"]
    bridge = launch("bridge", "bridge", "ctl", CONTROL).ready["grpc"]

    def transceiver(region: Region) -> None:
        launch(
            f"transceiver{region.cluster_id}",
            "transceiver",
            region.transceiver_host,
            region.transceiver_address,
            "--geosteer-address",
            geosteer,
            "--bridge-address",
            bridge,
            "--media-listen",
            f"{region.transceiver_address}:0",
            "--cluster-id",
            str(region.cluster_id),
            "--transceiver-id",
            "1",
            "--max-sessions",
            str(timers.max_sessions),
            "--rtt-report-interval-s",
            str(timers.rtt_report_interval_s),
        )

    def relay(region: Region) -> None:
        internal = region.relay_internal if region.transceivers else region.vip
        launch(
            f"relay{region.cluster_id}",
            "relay",
            region.relay_host,
            internal,
            "--geosteer-address",
            geosteer,
            "--cluster-id",
            str(region.cluster_id),
            "--udp-listen",
            f"{region.vip}:{RELAY_PORT}",
            "--internal-listen",
            f"{internal}:0",
            "--public-advertise",
            f"{region.vip}:{RELAY_PORT}",
        )

    # Start-up is mostly waiting for imports; two at a time keeps 2 cores busy.
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(transceiver, r) for r in world.regions if r.transceivers]
        jobs += [pool.submit(relay, r) for r in world.regions]
        for job in jobs:
            job.result()
    launch(
        "signaling",
        "signaling",
        "ctl",
        CONTROL,
        "--geosteer-address",
        geosteer,
        "--http-listen",
        f"{CONTROL}:{HTTP_PORT}",
    )
    _wait_registered(edge)


def _start_echoes(edge: RegionsEdge) -> None:
    for region in edge.world.regions:
        with edge.testbed.entered(region.relay_host):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((region.vip, ECHO_PORT))
        edge.echoes.append(probe.EchoServer(sock))


@contextlib.contextmanager
def world_edge(
    world: World, workdir: Path, api_key: str, timers: Timers | None = None
) -> Iterator[RegionsEdge]:
    """Builds the world's layout, its delay links, and the edge on it; tears all of it
    down on exit. Service logs go to workdir/services.log."""
    plan = layout.parse(layout_text(world))
    with net.Testbed(plan) as testbed, (workdir / "services.log").open("w") as log:
        mesh = MeshLinks(testbed, link_delays(world))
        edge = RegionsEdge(world, testbed, timers or Timers(), api_key=api_key, mesh=mesh)
        env = dict(os.environ, VOICEEDGE_API_KEY=api_key)
        try:
            _start_echoes(edge)
            _start_services(edge, _Launcher(edge, env, log), workdir)
            yield edge
        finally:
            for echo in edge.echoes:
                echo.close()
            stop_processes(
                [(s.name, s.process) for s in reversed(list(edge.services.values()))],
                grace_s=10.0,
            )


# -- steering: where each client's calls land, against the best first hop ----------------


@dataclass
class Landing:
    """One call: the cluster of its transceiver, the VIP media entered at, that first hop
    as the client probed it, and whether geosteer learnt an RTT from it."""

    cluster_id: int
    vip_region: str
    first_hop_ms: float
    learned: bool


@dataclass
class Row:
    client: Client
    probes_ms: dict[str, float]  # region name -> the client's probed RTT to its VIP
    landings: list[Landing] = field(default_factory=list)

    @property
    def best(self) -> tuple[str, float]:
        name = min(self.probes_ms, key=lambda n: self.probes_ms[n])
        return name, self.probes_ms[name]

    def within(self, call_index: int) -> bool:
        return within(self.landings[call_index].first_hop_ms, self.best[1])


def probe_all(edge: RegionsEdge, client: Client) -> dict[str, float]:
    return {r.name: edge.probe_ms(client, r) for r in edge.world.regions}


def place_and_learn(
    edge: RegionsEdge, client: Client, probes_ms: dict[str, float], learn_timeout_s: float
) -> Landing:
    """One call from `client`, held until geosteer holds an RTT measured for the client in
    the call's cluster (or learn_timeout_s): the next call is steered with it.

    A cluster this call fills (max_sessions 1 in the region test) hides the measurement
    until the call ends (see `RegionsEdge.measured`); the call is then held until the
    transceiver has measured the session's RTT and heartbeat with a report taken after
    that, and geosteer is asked again once the call is gone."""
    region = edge.world.region
    reported_at = [0.0]  # geosteer's clock at the heartbeat that carried our RTT
    learned = [False]

    async def until_learned(pc: RTCPeerConnection, result: CallResult) -> None:
        cluster = cluster_of(result)
        session_id = result.call_url.rstrip("/").rsplit("/", 1)[-1]
        measured_at = 0.0
        # A report taken after measured_at rides the first heartbeat after the next
        # sampling (every rtt_report_interval_s); two heartbeat intervals of margin.
        heartbeat_s = edge.timers.heartbeat_interval_ms / 1000
        window_s = edge.timers.rtt_report_interval_s + 2 * heartbeat_s
        deadline = time.monotonic() + learn_timeout_s
        while time.monotonic() < deadline:  # bounded; each check is one or two RPCs
            seen = await asyncio.to_thread(edge.measured, client, cluster)
            if seen:
                learned[0] = True
                return
            if seen is None and not measured_at:
                rtt = await asyncio.to_thread(edge.session_rtt_ms, region(cluster), session_id)
                measured_at = time.time() if rtt > 0 else 0.0
            elif seen is None:
                heard = await asyncio.to_thread(edge.last_heartbeat_unix, cluster)
                if heard > measured_at + window_s:
                    reported_at[0] = heard
                    return
            await asyncio.sleep(0.2)

    result = edge.call(client, until_learned)
    if result.status != 201 or result.remote_candidate is None:
        raise RuntimeError(f"{client.name}: call failed {result.status} {result.error_body}")
    cluster = cluster_of(result)
    if reported_at[0] and not learned[0]:
        learned[0] = _wait_measured(edge, client, cluster, learn_timeout_s)
    entry = edge.world.region_of_vip(result.remote_candidate[0])
    return Landing(cluster, entry.name, probes_ms[entry.name], learned[0])


def _wait_measured(edge: RegionsEdge, client: Client, cluster_id: int, timeout_s: float) -> bool:
    """After a call that filled its cluster: until the cluster has room again (the
    transceiver's next heartbeat) and geosteer's answer shows the measured RTT."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if edge.measured(client, cluster_id):
            return True
        time.sleep(0.1)
    return False


def steer(
    edge: RegionsEdge,
    clients: list[Client],
    *,
    calls: int,
    parallel: int,
    learn_timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every client probes every VIP, then places `calls` calls one after the other
    (`parallel` clients at a time); `progress` hears of each client's row when done."""

    def one(client: Client) -> Row:
        row = Row(client, probe_all(edge, client))
        for _ in range(calls):
            row.landings.append(place_and_learn(edge, client, row.probes_ms, learn_timeout_s))
        if progress is not None:
            progress(table_line(row))
        return row

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, clients))


def table(rows: list[Row]) -> list[str]:
    """The benchmark's table: one line per client."""
    header = f"{'client':13} {'best':>5} {'ms':>6}  calls: cluster/vip first-hop ms (* within)"
    return [header] + [table_line(row) for row in rows]


def table_line(row: Row) -> str:
    """One client: its best VIP and RTT, then each call's cluster, entry VIP, first hop,
    and `*` when that is within the target of the best."""
    name, best_ms = row.best
    calls = "  ".join(
        f"{landing.cluster_id}/{landing.vip_region} {landing.first_hop_ms:6.1f}"
        f"{'*' if row.within(i) else ' '}"
        for i, landing in enumerate(row.landings)
    )
    return f"{row.client.name:13} {name:>5} {best_ms:6.1f}  {calls}"


def share_within(rows: list[Row], call_index: int) -> float:
    """Percent of clients whose call `call_index` (-1: the last) was within the target."""
    if not rows:
        return 0.0
    return 100.0 * sum(row.within(call_index) for row in rows) / len(rows)


def summary(rows: list[Row]) -> str:
    """The benchmark's last line."""
    calls = min((len(row.landings) for row in rows), default=0)
    return (
        f"first contact within 10 %: {share_within(rows, 0):.0f} % of {len(rows)} clients; "
        f"after {calls} calls: {share_within(rows, -1):.0f} %"
    )
