"""What the cross-host tests share: the aiortc caller run from the client host, what it
saw of the network, and queries to the cluster's services from their hosts."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult, ToneTrack, run_call
from libs.wire import stun
from tools.netsim.edge import NetEdge
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

API_KEY = "sk-netsim-0123456789abcdef"
TONE_HZ = 440.0
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Addresses that must never reach a client: the cluster's internal network and hosts.
INTERNAL = re.compile(r"\b10\.\d+\.\d+\.\d+\b|203\.0\.113\.130|127\.0\.0\.1")


def candidates(sdp: str) -> set[tuple[str, int]]:
    found = set()
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            found.add((parts[4], int(parts[5])))
    return found


def sdp_attribute(sdp: str, name: str) -> str:
    for line in sdp.splitlines():
        if line.startswith(f"a={name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no a={name} in the SDP")


@dataclass
class Arrivals:
    """When each 20 ms frame of the agent's audio reached the caller (monotonic s)."""

    times: list[float] = field(default_factory=list)

    def gaps_after(self, t: float) -> float:
        """Seconds from t to the first frame after it."""
        later = [x for x in self.times if x > t]
        return later[0] - t if later else float("inf")

    def longest_gap_s(self, start: float, end: float) -> float:
        inside = [x for x in self.times if start <= x <= end]
        if len(inside) < 2:
            return end - start
        return float(np.max(np.diff([start, *inside, end])))


async def call_from_client(
    edge: NetEdge,
    during: Callable[[RTCPeerConnection, CallResult], Awaitable[None]] | None = None,
    *,
    track: ToneTrack | None = None,
    seconds: float = 1.0,
    connect_timeout_s: float = 20.0,
) -> CallResult:
    """An aiortc call placed from the client host: the event loop's thread sits in the
    client's namespace while the peer connection opens its sockets (setns is per thread)."""
    with edge.testbed.entered("client"):
        return await run_call(
            edge.http_base,
            API_KEY,
            track=track,
            seconds=seconds,
            during=during,
            connect_timeout_s=connect_timeout_s,
        )


def ice_credentials(pc: RTCPeerConnection, result: CallResult) -> tuple[str, str]:
    """(USERNAME the client's checks carry, the server's ICE password)."""
    server_ufrag = sdp_attribute(result.answer_sdp, "ice-ufrag")
    server_pwd = sdp_attribute(result.answer_sdp, "ice-pwd")
    client_ufrag = sdp_attribute(pc.localDescription.sdp, "ice-ufrag")
    return f"{server_ufrag}:{client_ufrag}", server_pwd


def xor_mapped_address(response: bytes) -> tuple[str, int]:
    """XOR-MAPPED-ADDRESS of a Binding success response (RFC 8489 §14.2, IPv4)."""
    value = stun.parse(response).get(ATTR_XOR_MAPPED_ADDRESS)
    assert value is not None, "no XOR-MAPPED-ADDRESS"
    port = int.from_bytes(value[2:4], "big") ^ (stun.MAGIC_COOKIE >> 16)
    raw = int.from_bytes(value[4:8], "big") ^ stun.MAGIC_COOKIE
    return ".".join(str((raw >> s) & 0xFF) for s in (24, 16, 8, 0)), port


def transaction_id() -> bytes:
    return os.urandom(12)


def sessions(edge: NetEdge) -> list[Any]:
    with (
        edge.testbed.entered("cluster"),
        grpc.insecure_channel(edge.stack.grpc("transceiver")) as channel,
    ):
        stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)
        return list(stub.ListSessions(transceiver_pb2.ListSessionsRequest(), timeout=5).sessions)


def live_session(edge: NetEdge) -> Any:
    live = [s for s in sessions(edge) if s.state != transceiver_pb2.SESSION_STATE_CLOSED]
    assert len(live) == 1, live
    return live[0]


def relay_bindings(edge: NetEdge) -> list[tuple[str, int]]:
    with edge.testbed.entered("relay"), grpc.insecure_channel(edge.stack.grpc("relay")) as ch:
        stub = relay_pb2_grpc.RelayAdminServiceStub(ch)
        found = stub.ListBindings(relay_pb2.ListBindingsRequest(page_size=1000), timeout=5)
    return [(b.client.ip, b.client.port) for b in found.bindings]


async def until(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    """Polls `check` (a blocking query: nothing to await) every 50 ms; returns when it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Capture:
    """Copies the UDP payloads a host's interface sees go to `target` (AF_PACKET, IPv4):
    the real packets a replay test sends again from somewhere else."""

    def __init__(self, edge: NetEdge, host: str, ifname: str, target: tuple[str, int]) -> None:
        with edge.testbed.entered(host):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self._sock.bind((ifname, 0x0800))
        self._sock.settimeout(0.2)
        self._target = (socket.inet_aton(target[0]), target[1])

    def next_payload(self, accept: Callable[[bytes], bool], timeout_s: float) -> bytes:
        """The first payload to target that `accept`s, within timeout_s (blocking)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                frame = self._sock.recv(65536)
            except TimeoutError:
                continue
            ip = frame[14:]
            header = (ip[0] & 0x0F) * 4
            if ip[9] != 17 or ip[16:20] != self._target[0]:
                continue
            udp = ip[header:]
            if int.from_bytes(udp[2:4], "big") != self._target[1]:
                continue
            payload = udp[8 : int.from_bytes(udp[4:6], "big")]
            if accept(payload):
                return bytes(payload)
        raise AssertionError("no matching packet captured")

    def close(self) -> None:
        self._sock.close()


def is_binding_request(payload: bytes) -> bool:
    return payload[:2] == b"\x00\x01"


def is_srtp(payload: bytes) -> bool:
    return len(payload) > 12 and 128 <= payload[0] <= 191 and not 192 <= payload[1] <= 223


# Chromium on the demo page: the page mints client secrets for loopback peers only, so
# the one fetch for a secret answers with the API key instead.
KEY_INSTEAD_OF_SECRET = f"""
const realFetch = window.fetch.bind(window);
window.fetch = (url, options) => url === "/demo/client_secret"
  ? Promise.resolve(new Response(JSON.stringify({{ value: "{API_KEY}" }})))
  : realFetch(url, options);
"""


# The page's own peer connection (a top-level `let`): audio RTP packets received so far.
INBOUND_PACKETS = """pc.getStats().then((stats) => {
  let received = 0;
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") received = s.packetsReceived;
  });
  return received;
})"""
