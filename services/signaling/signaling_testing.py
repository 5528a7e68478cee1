"""Signaling's test kit: in-process stand-ins for geosteer and transceivers, the real
signaling app in this process, real-looking offers, span capture and error-body assertions.

The stand-ins speak the real gRPC contracts on 127.0.0.1:0. The fake transceiver answers
like the real one must: the minted ufrag/password verbatim, no client candidates, one host
candidate per relay endpoint; it can refuse (RESOURCE_EXHAUSTED etc.) to test failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import grpc.aio
from aiortc import RTCConfiguration, RTCPeerConnection
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.service.runtime import new_server
from services.signaling.settings import SignalingSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

FAKE_FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)


def answer_from_offer(
    offer: str, ufrag: str, pwd: str, relays: Sequence[common_pb2.SocketAddress]
) -> str:
    """A plausible answer: every offered m-line accepted, transceiver credentials, relay
    host candidates only (what the real transceiver produces)."""
    lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0"]
    sections: list[list[str]] = []
    for line in offer.replace("\r\n", "\n").split("\n"):
        if line.startswith("a=group:"):
            lines.append(line)
        elif line.startswith("m="):
            sections.append([line])
        elif sections and line.startswith(("a=mid:", "a=rtpmap:", "a=sctp-port:", "a=rtcp-mux")):
            sections[-1].append(line)
    first = relays[0]
    for section in sections:
        lines.extend(
            [
                section[0],
                f"c=IN IP4 {first.ip}",
                *section[1:],
                f"a=ice-ufrag:{ufrag}",
                f"a=ice-pwd:{pwd}",
                f"a=fingerprint:{FAKE_FINGERPRINT}",
                "a=setup:active",
            ]
        )
        for index, relay in enumerate(relays):
            priority = 2130706431 - index
            lines.append(
                f"a=candidate:{index + 1} 1 udp {priority} {relay.ip} {relay.port} typ host"
            )
        lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"


@dataclass
class FakeTransceiver(transceiver_pb2_grpc.TransceiverServiceServicer):
    node_id: str
    transceiver_id: int
    refuse: grpc.StatusCode | None = None
    delay_s: float = 0.0
    sessions: dict[str, transceiver_pb2.CreateSessionRequest] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    restarts: list[transceiver_pb2.RestartIceRequest] = field(default_factory=list)
    address: str = ""
    sideband_ends: dict[str, asyncio.Event] = field(default_factory=dict)
    live: bool = True  # False: geosteer has declared it dead (ListTopology leaves it out)
    server: grpc.aio.Server | None = None  # stop it to make the node unreachable

    async def CreateSession(  # noqa: N802 (gRPC method name)
        self,
        request: transceiver_pb2.CreateSessionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> transceiver_pb2.CreateSessionResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # simulated slow node, not synchronisation
        if self.refuse is not None:
            await context.abort(self.refuse, f"{self.node_id} refuses")
        if "m=audio" not in request.offer_sdp:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offer has no audio m-line")
        if not request.relay_endpoints or not request.ice_ufrag or len(request.ice_pwd) < 22:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing ICE credentials")
        if request.session_id in self.sessions:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, request.session_id)
        self.sessions[request.session_id] = request
        answer = answer_from_offer(
            request.offer_sdp, request.ice_ufrag, request.ice_pwd, request.relay_endpoints
        )
        return transceiver_pb2.CreateSessionResponse(
            answer_sdp=answer, session_id=request.session_id
        )

    async def CloseSession(  # noqa: N802 (gRPC method name)
        self,
        request: transceiver_pb2.CloseSessionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> transceiver_pb2.CloseSessionResponse:
        if self.sessions.pop(request.session_id, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, request.session_id)
        self.closed.append(request.session_id)
        if request.session_id in self.sideband_ends:
            self.sideband_ends[request.session_id].set()
        return transceiver_pb2.CloseSessionResponse(
            session=transceiver_pb2.SessionInfo(
                session_id=request.session_id, state=transceiver_pb2.SESSION_STATE_CLOSED
            )
        )

    async def StreamSessionEvents(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[transceiver_pb2.StreamSessionEventsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[transceiver_pb2.StreamSessionEventsResponse]:
        """`session.created`, then each client event back inside a `fake.echo` event; ends
        when the session is closed."""
        first = await anext(request_iterator, None)
        if first is None or first.session_id not in self.sessions:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
        assert first is not None
        ended = asyncio.Event()
        self.sideband_ends[first.session_id] = ended
        yield transceiver_pb2.StreamSessionEventsResponse(
            server_event='{"type":"session.created","event_id":"event_f0","session":{}}'
        )
        requests = asyncio.ensure_future(anext(request_iterator, None))
        closed = asyncio.ensure_future(ended.wait())
        try:
            for number in itertools.count(1):
                await asyncio.wait({requests, closed}, return_when=asyncio.FIRST_COMPLETED)
                request = None if closed.done() else requests.result()
                if request is None:
                    return
                event = json.loads(request.client_event)
                echo = {"type": "fake.echo", "event_id": f"event_f{number}", "event": event}
                yield transceiver_pb2.StreamSessionEventsResponse(server_event=json.dumps(echo))
                requests = asyncio.ensure_future(anext(request_iterator, None))
        finally:
            requests.cancel()
            closed.cancel()

    async def RestartIce(  # noqa: N802 (gRPC method name)
        self,
        request: transceiver_pb2.RestartIceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> transceiver_pb2.RestartIceResponse:
        """Takes the new credentials of an open session; its answer's one candidate."""
        if self.refuse is not None:
            await context.abort(self.refuse, f"{self.node_id} refuses")
        created = self.sessions.get(request.session_id)
        if created is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, request.session_id)
        assert created is not None
        self.restarts.append(request)
        created.ice_ufrag, created.ice_pwd = request.ice_ufrag, request.ice_pwd
        endpoint = created.relay_endpoints[0]
        return transceiver_pb2.RestartIceResponse(
            session=transceiver_pb2.SessionInfo(
                session_id=request.session_id, ice_ufrag=request.ice_ufrag
            ),
            candidates=[f"a=candidate:1 1 udp 2130706431 {endpoint.ip} {endpoint.port} typ host"],
        )

    async def _unimplemented(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the fake")

    async def GetSession(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC)
        return await self._unimplemented(context)

    async def ListSessions(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC)
        return await self._unimplemented(context)

    async def Drain(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC)
        return await self._unimplemented(context)


@dataclass
class FakeGeosteer(geosteer_pb2_grpc.GeosteerServiceServicer):
    cluster_id: int
    relays: list[common_pb2.SocketAddress]
    transceivers: list[FakeTransceiver]
    refuse: grpc.StatusCode | None = None
    requests: list[geosteer_pb2.RouteSessionRequest] = field(default_factory=list)
    # Clusters offered, in this order, to a request that excludes the ones before them
    # (as geosteer's next-nearest): cluster id -> its transceivers.
    spill: dict[int, list[FakeTransceiver]] = field(default_factory=dict)

    async def RouteSession(  # noqa: N802 (gRPC method name)
        self,
        request: geosteer_pb2.RouteSessionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> geosteer_pb2.RouteSessionResponse:
        self.requests.append(request)
        if self.refuse is not None:
            await context.abort(self.refuse, "geosteer refuses")
        offered = {self.cluster_id: self.transceivers, **self.spill}
        excluded = set(request.hints.excluded_cluster_ids)
        left = [(c, nodes) for c, nodes in offered.items() if c not in excluded]
        if not left:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no cluster left")
        cluster_id, nodes = left[0]
        return geosteer_pb2.RouteSessionResponse(
            cluster=geosteer_pb2.Cluster(
                cluster_id=cluster_id, name=f"loopback-{cluster_id}", region="local", healthy=True
            ),
            relay_endpoints=self.relays,
            transceivers=[
                geosteer_pb2.TransceiverCandidate(
                    node_id=t.node_id, transceiver_id=t.transceiver_id, grpc_address=t.address
                )
                for t in nodes
            ],
        )

    async def _unimplemented(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the fake")

    async def RegisterNode(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC)
        return await self._unimplemented(context)

    async def Heartbeat(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC)
        return await self._unimplemented(context)

    async def DeregisterNode(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC)
        return await self._unimplemented(context)

    async def ListTopology(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.ListTopologyRequest, context: Any
    ) -> geosteer_pb2.ListTopologyResponse:
        """The cluster with its live transceivers (`live` False: declared dead)."""
        if self.refuse is not None:
            await context.abort(self.refuse, "geosteer refuses")
        nodes = [
            geosteer_pb2.Node(
                node_id=t.node_id,
                kind=common_pb2.NODE_KIND_TRANSCEIVER,
                cluster_id=self.cluster_id,
                transceiver_id=t.transceiver_id,
                grpc_address=t.address,
            )
            for t in self.transceivers
            if t.live
        ]
        cluster = geosteer_pb2.Cluster(cluster_id=self.cluster_id, name="loopback-1", nodes=nodes)
        return geosteer_pb2.ListTopologyResponse(
            topology=geosteer_pb2.Topology(clusters=[cluster], revision=1)
        )

    async def WatchTopology(  # noqa: N802 (gRPC)
        self, request: Any, context: Any
    ) -> AsyncIterator[geosteer_pb2.WatchTopologyResponse]:
        await self._unimplemented(context)
        yield geosteer_pb2.WatchTopologyResponse()  # unreachable: abort raises


@dataclass
class FakeCluster:
    geosteer: FakeGeosteer
    geosteer_address: str
    transceivers: list[FakeTransceiver]


async def _serve(
    add: Any, servicer: Any, stack: contextlib.AsyncExitStack
) -> tuple[str, grpc.aio.Server]:
    server = new_server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stack.push_async_callback(server.stop, None)
    return f"127.0.0.1:{port}", server


@contextlib.asynccontextmanager
async def fake_cluster(
    transceivers: int = 2, cluster_id: int = 7, relay_port: int = 3478, spill_clusters: int = 0
) -> AsyncIterator[FakeCluster]:
    """Geosteer and `transceivers` transceivers, each a real gRPC server on loopback; with
    `spill_clusters`, further clusters (ids cluster_id + 1, ...) of one transceiver each
    that geosteer offers when the ones before are excluded (`FakeGeosteer.spill`)."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [FakeTransceiver(f"transceiver-{i}", 40 + i) for i in range(transceivers)]
        spill = {
            cluster_id + n: [FakeTransceiver(f"transceiver-c{cluster_id + n}", 40)]
            for n in range(1, spill_clusters + 1)
        }
        for node in nodes + [t for ts in spill.values() for t in ts]:
            node.address, node.server = await _serve(
                transceiver_pb2_grpc.add_TransceiverServiceServicer_to_server, node, stack
            )
        geosteer = FakeGeosteer(
            cluster_id,
            [common_pb2.SocketAddress(ip="127.0.0.1", port=relay_port)],
            nodes,
            spill=spill,
        )
        address, _ = await _serve(
            geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server, geosteer, stack
        )
        yield FakeCluster(geosteer, address, nodes)


@dataclass
class RunningSignaling:
    base_url: str
    grpc_address: str
    service: Any  # CallService


@contextlib.asynccontextmanager
async def running_signaling(
    geosteer_address: str,
    api_keys: Sequence[str],
    *,
    clock: Any = None,
    settings: Any = None,
    store: Any = None,
    tracer: Any = None,
    keyring: Any = None,
    trusted_proxies: Sequence[str] = (),
    cors_origins: Sequence[str] = ("*",),
) -> AsyncIterator[RunningSignaling]:
    """The real signaling app (HTTP on 127.0.0.1:0 and the gRPC mirror) in this process."""
    import time

    from aiohttp import web

    from libs.wire.ufrag import dev_keyring
    from services.signaling.calls import CallService
    from services.signaling.http_api import build_app, make_runner
    from services.signaling.servicer import SignalingServicer
    from services.signaling.settings import SignalingSettings
    from services.signaling.store import MemoryCallStore
    from voiceedge.signaling.v1 import signaling_pb2_grpc

    clock = clock or time.time
    service = CallService(
        api_keys=api_keys,
        keyring=keyring or dev_keyring(),
        store=store if store is not None else MemoryCallStore(clock=clock),
        settings=dataclasses.replace(
            settings or SignalingSettings(),
            geosteer_address=geosteer_address,
            trusted_proxies=tuple(trusted_proxies),
            cors_origins=tuple(cors_origins),
        ),
        tracer=tracer,
        clock=clock,
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(service.close)
        app = build_app(service)
        runner = make_runner(app)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        grpc_address, _ = await _serve(
            signaling_pb2_grpc.add_SignalingServiceServicer_to_server,
            SignalingServicer(service),
            stack,
        )
        yield RunningSignaling(f"http://127.0.0.1:{port}", grpc_address, service)


# Shape of a Chrome offer (audio + "oai-events" data channel), credentials at media level.
CHROME_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS 6f2c",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=candidate:1467250027 1 udp 2122260223 192.168.1.20 54067 typ host generation 0",
        "a=ice-ufrag:Q9fE",
        "a=ice-pwd:ZWzL3HzmdLbg6YLr0DKzQ0vB",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 1F:2C:0B:7A:55:8E:91:3D:44:09:AA:BB:CC:DD:EE:FF:"
        "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF",
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=msid:6f2c 0c1d",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=ice-ufrag:Q9fE",
        "a=ice-pwd:ZWzL3HzmdLbg6YLr0DKzQ0vB",
        "a=fingerprint:sha-256 1F:2C:0B:7A:55:8E:91:3D:44:09:AA:BB:CC:DD:EE:FF:"
        "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF",
        "a=setup:actpass",
        "a=mid:1",
        "a=sctp-port:5000",
        "",
    ]
)


async def aiortc_offer() -> str:
    """A real offer from aiortc: audio transceiver + the OpenAI "oai-events" channel."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


API_KEY = "sk-test-key-0123456789"
OTHER_KEY = "sk-other-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SDP = {"Content-Type": "application/sdp"}


@dataclass
class Env:
    cluster: FakeCluster
    signaling: RunningSignaling
    http: aiohttp.ClientSession
    spans: InMemorySpanExporter
    now: list[float]

    def url(self, path: str) -> str:
        return self.signaling.base_url + path

    async def post_offer(
        self, offer: str = CHROME_OFFER, key: str = API_KEY
    ) -> aiohttp.ClientResponse:
        return await self.http.post(
            self.url("/v1/realtime/calls"),
            data=offer,
            headers={"Authorization": f"Bearer {key}", **SDP},
        )


@contextlib.asynccontextmanager
async def env(
    settings: SignalingSettings | None = None,
    geosteer_address: str | None = None,
    spill_clusters: int = 0,
    **kwargs: Any,
) -> AsyncIterator[Env]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    now = [1_800_000_000.0]
    async with (
        fake_cluster(spill_clusters=spill_clusters) as cluster,
        running_signaling(
            geosteer_address or cluster.geosteer_address,
            [API_KEY, OTHER_KEY],
            settings=settings,
            tracer=provider.get_tracer("test"),
            clock=lambda: now[0],
            **kwargs,
        ) as signaling,
        aiohttp.ClientSession() as http,
    ):
        yield Env(cluster, signaling, http, exporter, now)


async def expect_error(
    response: aiohttp.ClientResponse, status: int, error_type: str, code: str
) -> dict[str, Any]:
    body = await response.json()
    assert response.status == status, body
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(body) == {"error"}
    assert body["error"]["type"] == error_type
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


def answer_ufrag(answer: str) -> str:
    (line,) = [line for line in answer.splitlines() if line.startswith("a=ice-ufrag:")][:1]
    return line.split(":", 1)[1]


def no_sessions(cluster: FakeCluster) -> bool:
    return all(not node.sessions for node in cluster.transceivers)
