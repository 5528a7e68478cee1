"""Every access to aiortc/aioice internals lives here, pinned to aiortc 1.16 / aioice 0.13.

The transceiver needs four things the public APIs do not offer:
- force the ICE credentials signaling minted (aioice `Connection._local_username`,
  `Connection._local_password`) after setRemoteDescription and before createAnswer;
- skip host gathering (which opens one UDP socket per session and ignores loopback) and
  put our own shared-socket protocol and relay candidate in its place
  (`Connection._local_candidates`, `_local_candidates_start`, `_local_candidates_end`,
  `_protocols`, and `aioice.ice.StunProtocol`);
- read the selected candidate pair (`Connection._nominated`);
- reach the ICE connection from the gatherer (`RTCIceGatherer._connection`).

private_api_test.py fails with the attribute's name if an upgrade moves any of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.ice
import aiortc
from aioice.candidate import Candidate
from aiortc import RTCPeerConnection
from aiortc.rtcicetransport import RTCIceTransport

PINNED_AIORTC = "1.16."
PINNED_AIOICE = "0.13."

# (owner, attribute) pairs the code below relies on; the test checks each one exists.
CONNECTION_ATTRIBUTES = (
    "_local_username",
    "_local_password",
    "_local_candidates",
    "_local_candidates_start",
    "_local_candidates_end",
    "_protocols",
    "_nominated",
)
GATHERER_ATTRIBUTES = ("_connection",)
PEER_CONNECTION_ATTRIBUTES = ("_RTCPeerConnection__closeTask",)


class CompatError(RuntimeError):
    """aiortc/aioice no longer look like the versions this module was written for."""


def ice_transports(pc: RTCPeerConnection) -> list[RTCIceTransport]:
    """The distinct ICE transports of a peer connection, through public attributes only
    (transceiver.receiver.transport.transport and sctp.transport.transport)."""
    found: list[RTCIceTransport] = []
    for transceiver in pc.getTransceivers():
        ice = transceiver.receiver.transport.transport
        if all(ice is not other for other in found):
            found.append(ice)
    if pc.sctp is not None:
        ice = pc.sctp.transport.transport
        if all(ice is not other for other in found):
            found.append(ice)
    return found


def connection_of(ice: RTCIceTransport) -> aioice.Connection:
    connection = getattr(ice.iceGatherer, "_connection", None)
    if not isinstance(connection, aioice.Connection):
        raise CompatError("aiortc RTCIceGatherer._connection is not an aioice.Connection")
    return connection


def set_local_credentials(connection: aioice.Connection, ufrag: str, pwd: str) -> None:
    """Forces the server-side ICE ufrag/password (RFC 8445 §5.3) signaling minted."""
    connection._local_username = ufrag
    connection._local_password = pwd


def make_stun_protocol(connection: aioice.Connection) -> aioice.ice.StunProtocol:
    return aioice.ice.StunProtocol(connection)


def install_protocol(
    connection: aioice.Connection,
    protocol: aioice.ice.StunProtocol,
    transport: asyncio.DatagramTransport,
    host: str,
    port: int,
    *,
    reconnect: bool = True,
) -> Candidate:
    """Replaces host gathering: one protocol over our virtual transport whose local
    candidate is the relay endpoint (typ host, RFC 8445 §5.1.2 priority for a host)."""
    if connection._local_candidates_start:
        raise CompatError("ICE gathering already started; install the protocol before")
    candidate = Candidate(
        foundation="relay0",
        component=1,
        transport="udp",
        priority=aioice.candidate.candidate_priority(1, "host"),
        host=host,
        port=port,
        type="host",
    )
    if reconnect:
        protocol.connection_made(transport)
    protocol.local_candidate = candidate
    connection._protocols.append(protocol)
    connection._local_candidates = [candidate]
    connection._local_candidates_start = True
    connection._local_candidates_end = True
    return candidate


async def wait_pc_closed(pc: RTCPeerConnection) -> None:
    """aiortc closes a peer connection by itself once every DTLS transport is closed (the
    client hung up), in a task of its own (`RTCPeerConnection.__closeTask`); wait for it so
    no task outlives the session."""
    task = getattr(pc, "_RTCPeerConnection__closeTask", None)
    if isinstance(task, asyncio.Future) and not task.done():
        await asyncio.shield(task)


async def add_loopback_host_candidate(pc: RTCPeerConnection) -> list[asyncio.BaseTransport]:
    """Test clients only: aioice gathers no 127.0.0.1 candidate, so give each ICE transport
    of `pc` a real UDP socket on 127.0.0.1 as its host candidate (call before
    setLocalDescription). Returns the transports; aioice closes them with the connection."""
    loop = asyncio.get_running_loop()
    opened: list[asyncio.BaseTransport] = []
    for ice in ice_transports(pc):
        connection = connection_of(ice)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda connection=connection: aioice.ice.StunProtocol(connection),  # type: ignore[misc]
            local_addr=("127.0.0.1", 0),
        )
        host, port = transport.get_extra_info("sockname")[:2]
        install_protocol(connection, protocol, transport, host, port, reconnect=False)
        opened.append(transport)
    return opened


@dataclass(frozen=True)
class SelectedPair:
    local: tuple[str, int]
    remote: tuple[str, int]


def selected_pair(connection: aioice.Connection) -> SelectedPair | None:
    nominated: dict[int, Any] = connection._nominated
    pair = nominated.get(1)
    if pair is None:
        return None
    local = pair.local_candidate
    return SelectedPair((str(local.host), int(local.port)), tuple(pair.remote_addr))


def check_versions() -> None:
    """Raises CompatError naming what moved; called at start-up and by the test."""
    if not aiortc.__version__.startswith(PINNED_AIORTC):
        raise CompatError(f"aiortc {aiortc.__version__} is not the pinned {PINNED_AIORTC}x")
    if not aioice.__version__.startswith(PINNED_AIOICE):
        raise CompatError(f"aioice {aioice.__version__} is not the pinned {PINNED_AIOICE}x")
    connection = aioice.Connection(ice_controlling=False)
    for name in CONNECTION_ATTRIBUTES:
        if not hasattr(connection, name):
            raise CompatError(f"aioice.Connection.{name} is gone: update aiortc_compat.py")
    gatherer = aiortc.RTCIceGatherer(iceServers=[])
    for name in GATHERER_ATTRIBUTES:
        if not hasattr(gatherer, name):
            raise CompatError(f"aiortc.RTCIceGatherer.{name} is gone: update aiortc_compat.py")
    pc = RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    for name in PEER_CONNECTION_ATTRIBUTES:
        if not hasattr(pc, name):
            raise CompatError(f"aiortc.RTCPeerConnection.{name} is gone: update aiortc_compat.py")
    for method in ("connection_made", "datagram_received", "connection_lost", "send_stun"):
        if not hasattr(aioice.ice.StunProtocol, method):
            raise CompatError(f"aioice.ice.StunProtocol.{method} is gone")
