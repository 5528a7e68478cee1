"""GeosteerService over gRPC: thin conversion between protos and the pure core."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from libs.observability.metrics import GEOSTEER_RTT_SAMPLES_DROPPED, GEOSTEER_TOPOLOGY_REVISION
from libs.observability.telemetry import Telemetry, log_event
from libs.service.aio import cancel_and_wait
from libs.service.errors import StatusError, invalid_argument, resource_exhausted
from services.geosteer.geoip import ClientLocator, MmdbLocator, bundled_db_path
from services.geosteer.registry import Directory, HeartbeatUpdate, Snapshot, sweep_interval_s
from services.geosteer.rtt import RttTable, area_key
from services.geosteer.selection import (
    ClusterState,
    Endpoint,
    GeoPoint,
    NodeKind,
    NodeState,
    NoRouteError,
    RouteHints,
    RttSource,
    SwitchMargin,
    select_route,
)
from services.geosteer.settings import GeosteerSettings
from services.geosteer.store import RttReport, make_node_store
from services.geosteer.topology import TopologyError, load_topology
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

logger = logging.getLogger("voiceedge.geosteer")

Context = grpc.aio.ServicerContext[Any, Any]

MAX_NODE_ID_LEN = 256


def _invalid_node(message: str) -> StatusError:
    """A RegisterNode request missing what its kind needs."""
    return invalid_argument("invalid_node", message)


def _endpoint_from_proto(address: common_pb2.SocketAddress, where: str) -> Endpoint:
    try:
        ip = ipaddress.ip_address(address.ip)
    except ValueError:
        raise _invalid_node(f"{where}.ip {address.ip!r} is not an IP literal") from None
    if not 1 <= address.port <= 65535:
        raise _invalid_node(f"{where}.port {address.port} not in 1..65535")
    return Endpoint(str(ip), address.port, address.tcp)


def _endpoint_to_proto(endpoint: Endpoint) -> common_pb2.SocketAddress:
    return common_pb2.SocketAddress(ip=endpoint.ip, port=endpoint.port, tcp=endpoint.tcp)


def node_from_proto(node: geosteer_pb2.Node) -> NodeState:
    """Validates a registration; raises a StatusError naming the bad field."""
    if not node.node_id or len(node.node_id) > MAX_NODE_ID_LEN:
        raise _invalid_node(f"node.node_id: required, at most {MAX_NODE_ID_LEN} characters")
    try:
        kind = NodeKind(node.kind)
    except ValueError:
        raise _invalid_node(f"node.kind: unknown value {node.kind}") from None
    if kind is NodeKind.UNSPECIFIED:
        raise _invalid_node("node.kind: required")
    media: Endpoint | None = None
    if kind is NodeKind.TRANSCEIVER:
        if not node.HasField("media_address"):
            raise _invalid_node("node.media_address: required for a transceiver")
        media = _endpoint_from_proto(node.media_address, "node.media_address")
        if not node.grpc_address:
            raise _invalid_node("node.grpc_address: required for a transceiver")
    public = tuple(
        _endpoint_from_proto(a, f"node.public_endpoints[{i}]")
        for i, a in enumerate(node.public_endpoints)
    )
    if kind is NodeKind.RELAY and not public:
        raise _invalid_node("node.public_endpoints: required for a relay")
    if node.active_sessions < 0 or node.capacity_sessions < 0:
        raise _invalid_node("node sessions: must be >= 0")
    return NodeState(
        node_id=node.node_id,
        kind=kind,
        cluster_id=node.cluster_id,
        expires_at=0.0,
        transceiver_id=node.transceiver_id if kind is NodeKind.TRANSCEIVER else 0,
        grpc_address=node.grpc_address,
        media_address=media,
        public_endpoints=public,
        capacity_sessions=node.capacity_sessions,
        active_sessions=node.active_sessions,
        draining=node.draining,
        version=node.version,
    )


def node_to_proto(node: NodeState) -> geosteer_pb2.Node:
    message = geosteer_pb2.Node(
        node_id=node.node_id,
        kind=common_pb2.NodeKind.ValueType(int(node.kind)),
        cluster_id=node.cluster_id,
        transceiver_id=node.transceiver_id,
        grpc_address=node.grpc_address,
        public_endpoints=[_endpoint_to_proto(e) for e in node.public_endpoints],
        capacity_sessions=node.capacity_sessions,
        active_sessions=node.active_sessions,
        draining=node.draining,
        version=node.version,
        cpu_load=node.cpu_load,
    )
    if node.media_address is not None:
        message.media_address.CopyFrom(_endpoint_to_proto(node.media_address))
    stamp = Timestamp()
    stamp.FromNanoseconds(int(node.last_heartbeat_unix * 1e9))
    message.last_heartbeat_at.CopyFrom(stamp)
    return message


def cluster_to_proto(cluster: ClusterState, now: float) -> geosteer_pb2.Cluster:
    config = cluster.config
    return geosteer_pb2.Cluster(
        cluster_id=config.cluster_id,
        name=config.name,
        region=config.region,
        latitude=config.location.latitude,
        longitude=config.location.longitude,
        relay_endpoints=[_endpoint_to_proto(v.endpoint) for v in cluster.relay_vips(now)],
        nodes=[node_to_proto(n) for n in cluster.live_nodes(now)],
        capacity_sessions=cluster.capacity_sessions(now),
        healthy=cluster.is_healthy(now),
        active_sessions=cluster.active_sessions(now),
    )


def topology_to_proto(snapshot: Snapshot) -> geosteer_pb2.Topology:
    return geosteer_pb2.Topology(
        clusters=[cluster_to_proto(c, snapshot.now) for c in snapshot.clusters],
        revision=snapshot.revision,
    )


class GeosteerServicer(geosteer_pb2_grpc.GeosteerServiceServicer):
    """The gRPC face of a Directory and a ClientLocator."""

    def __init__(
        self,
        directory: Directory,
        locator: ClientLocator,
        *,
        default_cluster_id: int = 0,
        margin: SwitchMargin = SwitchMargin(),  # noqa: B008 (frozen, shared safely)
        area_deg: float = 0.0,
    ) -> None:
        self.directory = directory
        self.locator = locator
        self.default_cluster_id = default_cluster_id
        self.margin = margin
        self.area_deg = area_deg
        self.closing = asyncio.Event()

    async def RouteSession(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.RouteSessionRequest, context: Context
    ) -> geosteer_pb2.RouteSessionResponse:
        location = None
        located = False
        if request.client_ip:
            try:
                location, located = self.locator.resolve(request.client_ip)
            except ValueError:
                raise invalid_argument(
                    "invalid_client_ip",
                    f"client_ip {request.client_ip!r} is not an IP address literal",
                ) from None
        hints = RouteHints(
            preferred_region=request.hints.preferred_region,
            preferred_cluster_id=(
                request.hints.preferred_cluster_id
                if request.hints.HasField("preferred_cluster_id")
                else None
            ),
            excluded_cluster_ids=frozenset(request.hints.excluded_cluster_ids),
        )
        if not located and hints.preferred_cluster_id is None and self.default_cluster_id:
            hints = RouteHints(
                hints.preferred_region, self.default_cluster_id, hints.excluded_cluster_ids
            )
        client: GeoPoint | None = location.point if location is not None else None
        own = self.directory.rtt.lookup(request.client_ip) if located else {}
        area = (
            self.directory.rtt.lookup_area(
                area_key(client.latitude, client.longitude, self.area_deg)
            )
            if located and client is not None
            else {}
        )
        measured = {**area, **own}  # the client's own measurement wins
        snapshot = await self.directory.snapshot()
        try:
            decision = select_route(
                snapshot.clusters, client, snapshot.now, measured, hints, self.margin
            )
        except NoRouteError as exc:
            log_event(
                logger, "route.none", level=logging.WARNING, client__address=request.client_ip
            )
            # The contract's code for "nothing left": signaling answers HTTP 503.
            raise resource_exhausted("no_cluster_capacity", str(exc)) from exc
        nearby = (
            decision.rtt_source is RttSource.MEASURED and decision.cluster.cluster_id not in own
        )
        log_event(
            logger,
            "route.selected",
            client__address=request.client_ip,
            cluster__id=decision.cluster.cluster_id,
            rtt_ms=round(decision.estimated_rtt_ms or 0.0, 1),
            rtt_source=decision.rtt_source.value,
            rtt_nearby=nearby,
        )
        return geosteer_pb2.RouteSessionResponse(
            cluster=cluster_to_proto(decision.cluster, snapshot.now),
            relay_endpoints=[_endpoint_to_proto(e) for e in decision.relay_endpoints],
            transceivers=[
                geosteer_pb2.TransceiverCandidate(
                    node_id=t.node_id,
                    transceiver_id=t.transceiver_id,
                    grpc_address=t.grpc_address,
                    media_address=(
                        _endpoint_to_proto(t.media_address) if t.media_address else None
                    ),
                    load=t.load,
                )
                for t in decision.transceivers
            ],
            estimated_rtt_ms=decision.estimated_rtt_ms or 0.0,
            estimated_rtt_measured=decision.rtt_source is RttSource.MEASURED,
            estimated_rtt_nearby=nearby,
            client_region=location.country if located and location is not None else "",
            client_latitude=client.latitude if located and client is not None else 0.0,
            client_longitude=client.longitude if located and client is not None else 0.0,
        )

    async def RegisterNode(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.RegisterNodeRequest, context: Context
    ) -> geosteer_pb2.RegisterNodeResponse:
        await self.directory.register(node_from_proto(request.node))
        return geosteer_pb2.RegisterNodeResponse(
            heartbeat_interval_ms=round(self.directory.heartbeat_interval_s * 1000),
            heartbeat_ttl_ms=round(self.directory.heartbeat_ttl_s * 1000),
        )

    async def Heartbeat(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.HeartbeatRequest, context: Context
    ) -> geosteer_pb2.HeartbeatResponse:
        update = HeartbeatUpdate(
            active_sessions=request.active_sessions,
            capacity_sessions=request.capacity_sessions,
            draining=request.draining,
            cpu_load=min(1.0, max(0.0, request.cpu_load)),
        )
        samples = [
            RttReport(s.client_prefix, s.rtt_ms, s.sample_count) for s in request.rtt_samples
        ]
        known = await self.directory.heartbeat(request.node_id, update, samples)
        return geosteer_pb2.HeartbeatResponse(known=known)

    async def DeregisterNode(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.DeregisterNodeRequest, context: Context
    ) -> geosteer_pb2.DeregisterNodeResponse:
        return geosteer_pb2.DeregisterNodeResponse(
            removed=await self.directory.deregister(request.node_id)
        )

    async def ListTopology(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.ListTopologyRequest, context: Context
    ) -> geosteer_pb2.ListTopologyResponse:
        snapshot = await self.directory.snapshot()
        return geosteer_pb2.ListTopologyResponse(topology=topology_to_proto(snapshot))

    async def WatchTopology(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.WatchTopologyRequest, context: Context
    ) -> AsyncIterator[geosteer_pb2.WatchTopologyResponse]:
        sent = 0
        while not self.closing.is_set():
            snapshot = await self.directory.snapshot()
            if snapshot.revision > sent:
                sent = snapshot.revision
                yield geosteer_pb2.WatchTopologyResponse(
                    topology=topology_to_proto(snapshot), revision=snapshot.revision
                )
            changed = asyncio.ensure_future(self.directory.wait_changed(sent))
            closing = asyncio.ensure_future(self.closing.wait())
            try:
                await asyncio.wait({changed, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(changed, closing)


def open_locator(settings: GeosteerSettings) -> ClientLocator:
    default = (
        GeoPoint(settings.default_latitude, settings.default_longitude)
        if (settings.default_latitude, settings.default_longitude) != (0.0, 0.0)
        else None
    )
    if settings.geoip_db_path == "off":
        return ClientLocator(None, default)
    path = settings.geoip_db_path or bundled_db_path()
    return ClientLocator(MmdbLocator(path), default, locate_private=settings.geoip_locate_private)


class Geosteer:
    """Everything one geosteer process runs: directory, locator, servicer, sweeper."""

    def __init__(
        self,
        settings: GeosteerSettings,
        *,
        clock: Callable[[], float] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        clusters = load_topology(settings.topology_path)
        ids = {c.cluster_id for c in clusters}
        if settings.default_cluster_id and settings.default_cluster_id not in ids:
            raise TopologyError(
                f"default_cluster_id: {settings.default_cluster_id} is not in the topology"
            )
        clock = clock or time.monotonic
        interval_s = settings.heartbeat_interval_ms / 1000
        ttl_s = settings.heartbeat_ttl_ms / 1000
        self.directory = Directory(
            clusters,
            make_node_store(
                settings.redis_url,
                timeout_s=settings.redis_timeout_s,
                # A replica that missed a change notice learns it within one sweep.
                poll_s=sweep_interval_s(interval_s, ttl_s),
                clock=clock,
                # An injected clock (tests) is the leases' only time, in Redis too.
                wall_clock=time.time if clock is time.monotonic else clock,
            ),
            RttTable(
                settings.rtt_max_prefixes,
                settings.rtt_ewma_alpha,
                settings.rtt_max_age_s,
                clock=clock,
            ),
            heartbeat_interval_s=interval_s,
            heartbeat_ttl_s=ttl_s,
            clock=clock,
            area_of=lambda prefix: self._area_of(prefix, settings.rtt_area_deg),
        )
        self.locator = open_locator(settings)
        self.servicer = GeosteerServicer(
            self.directory,
            self.locator,
            default_cluster_id=settings.default_cluster_id,
            margin=SwitchMargin(settings.rtt_switch_share, settings.rtt_switch_slack_ms),
            area_deg=settings.rtt_area_deg,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Whether the registry answered at the last sweep (always, in memory); health
        # follows it through `report_health`.
        self.registry_reachable = True
        self._reachable_changed = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        if telemetry is not None:
            self._instrument(telemetry)

    def _instrument(self, telemetry: Telemetry) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        directory = self.directory

        def revision(_: CallbackOptions) -> list[Observation]:
            return [Observation(directory.revision)]

        def dropped(_: CallbackOptions) -> list[Observation]:
            return [Observation(directory.rtt_samples_dropped)]

        GEOSTEER_TOPOLOGY_REVISION.create(telemetry.meter, [revision])
        GEOSTEER_RTT_SAMPLES_DROPPED.create(telemetry.meter, [dropped])

    def _area_of(self, prefix: str, area_deg: float) -> str:
        """The area of a reported prefix: where GeoIP places its first address."""
        if area_deg <= 0:
            return ""
        try:
            network = ipaddress.ip_network(prefix.strip(), strict=False)
            location, located = self.locator.resolve(str(network.network_address))
        except ValueError:
            return ""  # the RTT table refuses and counts the sample
        if not located or location is None:
            return ""
        return area_key(location.point.latitude, location.point.longitude, area_deg)

    def _on_reachable(self, reachable: bool) -> None:
        if reachable == self.registry_reachable:
            return
        self.registry_reachable = reachable
        log_event(
            logger,
            "registry.reachable" if reachable else "registry.unreachable",
            level=logging.INFO if reachable else logging.WARNING,
        )
        self._reachable_changed.set()

    def start(self) -> None:
        """Starts the sweeper and the follower of other replicas' changes."""
        if not self._tasks:
            self._tasks = [
                asyncio.ensure_future(self.directory.run_sweeper(self._on_reachable)),
                asyncio.ensure_future(self.directory.run_follower()),
            ]

    def report_health(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Hands every change of `registry_reachable` to `set_serving` until close() or
        stop_health(): a replica whose Redis registry is unreachable can neither route nor
        take heartbeats, so it says NOT_SERVING and a balancer or Kubernetes readiness
        takes it out until Redis answers again (at the next sweep)."""

        async def follow() -> None:
            while True:
                self._reachable_changed.clear()
                await set_serving(self.registry_reachable)
                await self._reachable_changed.wait()

        self._health_task = asyncio.ensure_future(follow())
        self._tasks.append(self._health_task)

    async def stop_health(self) -> None:
        """Health is no longer the registry's to say (the process drains)."""
        if self._health_task is not None:
            await cancel_and_wait(self._health_task)

    async def close(self) -> None:
        """Stops the background tasks, ends watch streams, closes the database and the
        registry's connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.servicer.closing.set()
        await cancel_and_wait(*self._tasks)
        self.locator.close()
        await self.directory.store.close()
