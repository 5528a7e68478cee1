"""Shared test kit: real-looking offers, the in-process signaling environment with span
capture, and error-body assertions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.signaling.fakes import FakeCluster, RunningSignaling, fake_cluster, running_signaling
from services.signaling.settings import SignalingSettings

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
    settings: SignalingSettings | None = None, geosteer_address: str | None = None, **kwargs: Any
) -> AsyncIterator[Env]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    now = [1_800_000_000.0]
    async with (
        fake_cluster() as cluster,
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
