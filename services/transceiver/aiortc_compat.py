"""Every access to aiortc/aioice internals lives here, pinned to aiortc 1.16 / aioice 0.13.

What the transceiver needs that the public APIs do not offer:
- reach the ICE connection from the gatherer (`RTCIceGatherer._connection`);
- force the ICE credentials signaling minted (aioice `Connection._local_username`,
  `Connection._local_password`) after setRemoteDescription and before createAnswer;
- skip host gathering (which opens one UDP socket per session and ignores loopback) and
  put our own shared-socket protocol and relay candidate in its place
  (`Connection._local_candidates`, `_local_candidates_start`, `_local_candidates_end`,
  `_protocols`, and `aioice.ice.StunProtocol`);
- read the selected candidate pair (`Connection._nominated`);
- replace aioice's consent-freshness loop (`Connection.query_consent`, `build_request`,
  `_query_consent_task`), whose checks give up after one 0.5 s try, with one that follows
  RFC 7675 §5.1: consent expires a set time after the last answered check;
- ICE restart without a new DTLS handshake (`Connection._local_username`,
  `_local_password`, `_check_list`, `_nominating`, `_remote_candidates`, and for test
  clients `_pair_remote_candidate`, `check_start_task`): see `restart_ice`;
- mark an ICE-TCP client's peer-reflexive candidate tcp (`Connection._remote_candidates`,
  `check_incoming`): see `install_tcp_peers`;
- follow the client to a new address after a NAT rebinding (`Connection.check_incoming`,
  `check_complete`, `_check_list`, `_nominated`): see `install_follow_client`;
- find and await the tasks aiortc starts without a handle (`RTCPeerConnection.__connect`,
  `__closeTask`): see `index_pc_tasks`, `let_early_connect_return`, `wait_pc_closed`;
- know when the caller has acknowledged what its data channel was sent (the SCTP queues
  `RTCSctpTransport._data_channel_queue`, `_outbound_queue`, `_sent_queue`), so a session
  the server ends tells the caller why before the DTLS close alert: see
  `wait_data_channel_delivered`;
- run audio RTP on our own path (services/transceiver/rtp.py) once DTLS keyed SRTP: the
  SRTP sessions (`RTCDtlsTransport._rx_srtp`, `_tx_srtp`), and what aiortc's RTCP sender
  reports need from the packets we send (`RTCRtpSender.__ntp_timestamp`, `__rtp_timestamp`,
  `__packet_count`, `__octet_count`), and the caller's last sender report for our receiver
  reports (`RTCRtpReceiver.__lsr`, `__lsr_time`);
- see each caller receiver report on our stream for the metrics (`RTCRtpSender.
  _handle_rtcp_packet`, `_ssrc`, and our last sender report's `__lsr`, `__lsr_time` for its
  round-trip time): see `tap_receiver_reports`.

Test clients and load generators only: `add_loopback_host_candidate`,
`install_fast_audio_level` (`aiortc.rtp.compute_audio_level_dbov`, which aiortc's sender
calls per audio frame it encodes: the transceiver's own sender never encodes one),
`tap_encoded_audio` (`RTCRtpReceiver.__decoder_queue`), `tap_rtp_arrivals`
(`RTCRtpReceiver._handle_rtp_packet`) and `tap_rtp_datagrams`.

private_api_test.py fails with the attribute's name if an upgrade moves any of them.
"""

from __future__ import annotations

import asyncio
import functools
import math
import queue
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aioice
import aioice.ice
import aioice.stun
import aiortc
import aiortc.rtp
import numpy as np
import pylibsrtp
from aioice.candidate import Candidate
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.rtcicetransport import RTCIceTransport

from libs.wire.classify import is_rtp

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
    "_query_consent_task",
    "_closing",
    "_check_list",
    "check_incoming",
    "check_complete",
    "_nominating",
    "_remote_candidates",
    "_pair_remote_candidate",
    "check_start_task",
)
GATHERER_ATTRIBUTES = ("_connection",)
RECEIVER_ATTRIBUTES = ("_RTCRtpReceiver__decoder_queue",)
SENDER_REPORT_ATTRIBUTES = (
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__octet_count",
)
DTLS_ATTRIBUTES = ("_rx_srtp", "_tx_srtp")
RECEIVER_REPORT_ATTRIBUTES = ("_RTCRtpReceiver__lsr", "_RTCRtpReceiver__lsr_time")
SENDER_RTT_ATTRIBUTES = ("_RTCRtpSender__lsr", "_RTCRtpSender__lsr_time")
PEER_CONNECTION_ATTRIBUTES = ("_RTCPeerConnection__closeTask", "_RTCPeerConnection__connect")
# Not yet sent, sent but not acknowledged (SACK, RFC 4960 §6.2): empty = all delivered.
SCTP_QUEUE_ATTRIBUTES = ("_data_channel_queue", "_outbound_queue", "_sent_queue")
# How often wait_data_channel_delivered looks at the queues (SACKs come per RTT or 200 ms).
SCTP_DELIVERY_POLL_S = 0.01


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


_PC_TASK_NAMES = ("RTCPeerConnection.__connect", "RTCPeerConnection.close")
_indexed_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_pc_task_index: weakref.WeakKeyDictionary[Any, set[asyncio.Task[Any]]] = weakref.WeakKeyDictionary()


def _owner(coro: Any) -> Any:
    """The RTCPeerConnection a `__connect` / `close` coroutine runs for (its `self`)."""
    frame = getattr(coro, "cr_frame", None)
    return frame.f_locals.get("self") if frame is not None else None


def index_pc_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Records the tasks aiortc starts without keeping a handle (`__connect`, and `close`
    when DTLS ended) per peer connection as they are created, so that finding a session's
    is a lookup, not a scan of every task on the loop: ~1 ms per scan with 400 sessions'
    tasks, two or three scans per session, and 400 at once when a drain or a broken bridge
    stream closes them all. Chains a task factory already set. Idempotent per loop."""
    if loop in _indexed_loops:
        return
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        task: Any
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if getattr(coro, "__qualname__", "") in _PC_TASK_NAMES:
            pc = _owner(coro)
            if pc is not None:
                tasks = _pc_task_index.setdefault(pc, set())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        return task

    loop.set_task_factory(factory)
    _indexed_loops.add(loop)


def _pc_tasks(pc: RTCPeerConnection, names: tuple[str, ...]) -> list[asyncio.Task[Any]]:
    """`pc`'s live tasks among `names`: from the index on an indexed loop, else by scanning
    every task."""
    indexed = asyncio.get_running_loop() in _indexed_loops
    candidates = list(_pc_task_index.get(pc, ())) if indexed else asyncio.all_tasks()
    found = []
    for task in candidates:
        coro = task.get_coro()
        if task.done() or getattr(coro, "__qualname__", "") not in names:
            continue
        if _owner(coro) is pc:
            found.append(task)
    return found


async def let_early_connect_return(pc: RTCPeerConnection) -> None:
    """setRemoteDescription schedules aiortc's `__connect`; run it while the gatherer has no
    local candidate, so it returns at once as in stock aiortc. Otherwise it would start
    ICE/DTLS/SCTP beside the `__connect` of setLocalDescription, and the two SCTP starts
    race (seen as data channels that never open)."""
    for _ in range(10):
        if not _pc_tasks(pc, ("RTCPeerConnection.__connect",)):
            return
        await asyncio.sleep(0)
    raise CompatError("aiortc's RTCPeerConnection.__connect did not return at once")


async def wait_pc_closed(pc: RTCPeerConnection, timeout_s: float = 5.0) -> None:
    """After pc.close(): wait for the fire-and-forget tasks aiortc keeps no handle on
    (`__connect`, started by setLocalDescription/setRemoteDescription, ends one ICE pacing
    tick after close) and for `__closeTask` (aiortc closes by itself once the client's DTLS
    closed), so no task outlives the session."""
    pending: list[asyncio.Future[Any]] = []
    close_task = getattr(pc, "_RTCPeerConnection__closeTask", None)
    if isinstance(close_task, asyncio.Future) and not close_task.done():
        pending.append(close_task)
    pending += _pc_tasks(pc, _PC_TASK_NAMES)
    current = asyncio.current_task()
    pending = [t for t in pending if t is not current]
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


def data_channel_delivered(pc: RTCPeerConnection) -> bool:
    """True when every data-channel message sent so far was acknowledged by the peer (or
    there is no association to deliver on)."""
    sctp = pc.sctp
    if sctp is None or sctp.state != "connected":
        return True
    return not any(getattr(sctp, name) for name in SCTP_QUEUE_ATTRIBUTES)


async def wait_data_channel_delivered(pc: RTCPeerConnection, timeout_s: float) -> bool:
    """Waits, up to `timeout_s`, for data_channel_delivered; returns whether it came. aiortc
    has no event for an acknowledgement, so the queues are looked at every few ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not data_channel_delivered(pc):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(SCTP_DELIVERY_POLL_S)
    return True


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


def audio_level_dbov(frame: Any) -> int:
    """RFC 6465 Appendix A audio level, the same value aiortc's pure-Python loop computes
    (over the whole first plane, divided by frame.samples), with numpy: ~0.7 ms -> ~10 us
    per 20 ms frame."""
    samples = np.frombuffer(bytes(frame.planes[0]), dtype=np.int16).astype(np.float64)
    rms = math.sqrt(float(np.dot(samples, samples)) / (frame.samples * 32767 * 32767))
    if rms <= 0:
        return -127
    return round(min(max(20 * math.log10(rms), -127), 0))


def install_fast_audio_level() -> None:
    """Test clients only: aiortc's RTCRtpSender looks `rtp.compute_audio_level_dbov` up on
    every audio frame it encodes (a caller's tone track); point it at the numpy version.
    The transceiver's own senders hold a track that never yields (media.IdleTrack).
    Idempotent."""
    if not hasattr(aiortc.rtp, "compute_audio_level_dbov"):
        raise CompatError("aiortc.rtp.compute_audio_level_dbov is gone")
    aiortc.rtp.compute_audio_level_dbov = audio_level_dbov


def install_consent_freshness(
    connection: aioice.Connection,
    *,
    interval_s: float,
    expiry_s: float,
    retransmissions: int,
    on_expired: Callable[[], None] | None = None,
) -> None:
    """Replaces aioice's consent loop for `connection` (call before ICE connects): a check
    every `interval_s` (randomised 0.8-1.2x, RFC 7675 §5.1), each a STUN transaction with
    `retransmissions` (RFC 8489 §6.2.1, RTO 0.5 s doubling: 3 keep it open 7.5 s, so an
    answer delayed by a busy event loop or network still counts).

    aioice 0.13 sends each check once, waits 0.5 s and closes after 6 consecutive misses,
    so an event loop that lags over 0.5 s for 30 s ends calls whose every check was
    answered. Here several checks may be open at once, and consent expires only
    `expiry_s` after the last answer (RFC 7675: 30 s).

    `on_expired` set: at expiry the loop calls it and ends, leaving the connection open
    (the session holds media and waits for an ICE restart, `refresh_consent` starts the
    checks again); unset: it closes the connection, as aioice does. Each check reads the
    remote password afresh: an ICE restart changes it."""
    run = functools.partial(
        _consent_loop, connection, interval_s, expiry_s, retransmissions, on_expired
    )
    setattr(connection, "query_consent", run)  # noqa: B010 (shadowing a method on purpose)


async def _consent_loop(
    connection: aioice.Connection,
    interval_s: float,
    expiry_s: float,
    retransmissions: int,
    on_expired: Callable[[], None] | None,
) -> None:
    if connection.remote_password is None:
        raise CompatError("aioice started consent checks without the remote password")
    loop = asyncio.get_running_loop()
    last_answer = loop.time()
    checks: set[asyncio.Task[None]] = set()

    async def check(pair: Any) -> None:
        nonlocal last_answer
        request = connection.build_request(pair, nominate=False)
        password = connection.remote_password or ""
        try:
            await pair.protocol.request(
                request,
                pair.remote_addr,
                integrity_key=password.encode("utf8"),
                retransmissions=retransmissions,
            )
        except aioice.stun.TransactionError:
            return
        last_answer = max(last_answer, loop.time())

    try:
        while True:
            await asyncio.sleep(interval_s * (0.8 + 0.4 * random.random()))
            if loop.time() - last_answer >= expiry_s:
                if on_expired is not None:
                    on_expired()
                    return
                # As aioice does: clear the task handle first (consent_expired() reads it),
                # so close() does not cancel this coroutine.
                connection._query_consent_task = None
                await connection.close()
                return
            for pair in list(connection._nominated.values()):
                task = loop.create_task(check(pair))
                checks.add(task)
                task.add_done_callback(checks.discard)
    finally:
        for task in list(checks):
            task.cancel()
        if checks:
            await asyncio.gather(*checks, return_exceptions=True)


def install_follow_client(
    connection: aioice.Connection, on_move: Callable[[], None] | None = None
) -> None:
    """Lets the selected pair follow the client to a new address (a NAT rebinding) with the
    same credentials and no renegotiation (call before ICE connects).

    aioice, as the controlled agent, selects a pair only on USE-CANDIDATE (RFC 8445
    §7.3.1.5), and a browser nominates once: after its NAT changes the public port, its
    checks arrive from a new address, aioice learns it as a peer-reflexive candidate and
    runs a triggered check (§7.3.1.3-4), but keeps sending to the dead old address. Here a
    pair becomes the selected one when both hold: the latest check from the client came
    from its remote address (that request passed MESSAGE-INTEGRITY with our password, so it
    is the client's), and our own check to that address succeeded (answered with the
    client's password: consent to receive there, RFC 7675 §5.1). A forged request fails the
    first test; a replayed one from another address fails the second, so neither moves the
    pair. Only after ICE completed: before that, nomination is aioice's. `on_move` runs
    after each switch (the session re-reads the pair its own RTP path sends to)."""
    original_incoming = connection.check_incoming
    original_complete = connection.check_complete
    last_from: dict[int, tuple[str, int]] = {}

    def follow(pair: Any) -> None:
        component = pair.component
        current = connection._nominated.get(component)
        if current is None or current is pair or connection.ice_controlling:
            return
        if pair.state != aioice.ice.CandidatePair.State.SUCCEEDED:
            return
        if last_from.get(component) != tuple(pair.remote_addr):
            return
        pair.nominated = True
        connection._nominated[component] = pair
        if on_move is not None:
            on_move()

    def check_incoming(message: Any, addr: tuple[str, int], protocol: Any) -> None:
        original_incoming(message, addr, protocol)
        last_from[protocol.local_candidate.component] = (addr[0], addr[1])
        for pair in list(connection._check_list):
            if pair.protocol is protocol and tuple(pair.remote_addr) == tuple(addr):
                follow(pair)  # back to a pair already proven (the client returned)

    def check_complete(pair: Any) -> None:
        before = connection._nominated.get(pair.component)
        original_complete(pair)
        if before is not None and connection._nominated.get(pair.component) is not before:
            # aioice switched by itself (the client's check carried USE-CANDIDATE, as
            # Chromium's do): the session must still hear of it.
            if on_move is not None:
                on_move()
            return
        follow(pair)

    setattr(connection, "check_incoming", check_incoming)  # noqa: B010 (on purpose)
    setattr(connection, "check_complete", check_complete)  # noqa: B010


def refresh_consent(connection: aioice.Connection) -> None:
    """A new pair was just selected, its check answered: that is consent (RFC 7675 §5.1),
    so the consent loop starts over from now, on the new pair (a loop still counting from
    the old pair's last answer would expire a path that works). Also starts it again after
    it ended at expiry with an `on_expired` callback. Before ICE connected (no loop yet)
    nothing happens: aioice starts it."""
    task = connection._query_consent_task
    if connection._closing or task is None:
        return
    if not task.done():
        task.cancel()
    connection._query_consent_task = asyncio.get_running_loop().create_task(
        connection.query_consent()
    )


@dataclass(frozen=True)
class IceCredentials:
    """Both sides' ICE credentials after a restart: ours (local) and the peer's (remote)."""

    local_ufrag: str
    local_pwd: str
    remote_ufrag: str
    remote_pwd: str


def _reset_checks(connection: aioice.Connection, credentials: IceCredentials) -> None:
    """New credentials on both sides and an empty check list (RFC 8445 §9): checks with the
    old credentials are stopped and every pair must be proven again; `_nominated` is kept,
    so media goes on over the old pair until a new one is selected (make before break)."""
    for pair in connection._check_list:
        if pair.task is not None:
            pair.task.cancel()
    connection._check_list.clear()
    connection._nominating.clear()
    connection._local_username = credentials.local_ufrag
    connection._local_password = credentials.local_pwd
    connection.remote_username = credentials.remote_ufrag
    connection.remote_password = credentials.remote_pwd


def restart_ice(connection: aioice.Connection, credentials: IceCredentials) -> None:
    """ICE restart on our (controlled) side: the peer's next checks carry the new
    credentials; aioice answers them, learns the peer (again) as peer-reflexive, runs its
    triggered check with the new remote password and, once that succeeds and the peer
    nominates, selects the new pair (install_follow_client reports the switch). The
    peer-reflexive candidates learnt before are forgotten with their pairs. DTLS runs over
    whatever pair is selected, so its keys, SCTP and SRTP carry on untouched."""
    _reset_checks(connection, credentials)
    connection._remote_candidates = [c for c in connection._remote_candidates if c.type != "prflx"]


def restart_client_ice(connection: aioice.Connection, credentials: IceCredentials) -> None:
    """Test clients only: ICE restart on the controlling side (aiortc has no restartIce):
    new credentials, then a check to each signalled remote candidate, which nominates
    (aioice's aggressive nomination) and so selects the new pair."""
    _reset_checks(connection, credentials)
    for candidate in connection._remote_candidates:
        connection._pair_remote_candidate(candidate)
    connection.sort_check_list()
    for pair in list(connection._check_list):
        connection.check_start_task(pair)


def install_tcp_peers(
    connection: aioice.Connection, is_tcp: Callable[[tuple[str, int]], bool]
) -> None:
    """Marks the peer-reflexive candidates of ICE-TCP clients as tcp (RFC 6544).

    aioice has no ICE-TCP: it learns every client as a udp peer-reflexive candidate
    (`Connection.check_incoming`, `_remote_candidates`, `Candidate.transport`). A relay
    carries a TCP client's RFC 4571 frames to our one UDP port with the framing's TCP flag,
    so to aioice it looks like any other client; only the candidate's transport is wrong.
    After aioice learned it, this sets it to tcp (the pair's protocol as the transceiver
    reports it; aioice itself sends the same way either way). `is_tcp` is the mux's
    knowledge of the client's transport."""
    original_incoming = connection.check_incoming

    def check_incoming(message: Any, addr: tuple[str, int], protocol: Any) -> None:
        original_incoming(message, addr, protocol)
        if not is_tcp((addr[0], addr[1])):
            return
        for candidate in connection._remote_candidates:
            learned = candidate.type == "prflx" and candidate.transport == "udp"
            if learned and (candidate.host, candidate.port) == (addr[0], addr[1]):
                candidate.transport = "tcp"

    setattr(connection, "check_incoming", check_incoming)  # noqa: B010 (on purpose)


def remote_transport(connection: aioice.Connection) -> str:
    """ "udp" or "tcp": the transport of the selected pair's remote candidate ("" before)."""
    pair = connection._nominated.get(1)
    return "" if pair is None else str(pair.remote_candidate.transport)


def consent_expired(connection: aioice.Connection) -> bool:
    """True if aioice closed the connection because consent freshness failed (RFC 7675):
    its consent loop clears `_query_consent_task` before closing, while close() from a
    hang-up only cancels it."""
    return bool(connection._closing) and connection._query_consent_task is None


EncodedSink = Callable[[bytes, int], None]


class _DecoderQueueTap:
    """Stands in for RTCRtpReceiver's decoder queue: encoded frames (one Opus packet each,
    after aiortc's jitter buffer, RTP timestamp) go to `sink` on the event loop instead of
    to aiortc's decoder thread; the stop marker still reaches the thread so it ends."""

    def __init__(self, real: queue.Queue[Any], sink: EncodedSink) -> None:
        self._real = real
        self._sink = sink

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            self._real.put(None)
            return
        _codec, encoded_frame = item
        self._sink(bytes(encoded_frame.data), int(encoded_frame.timestamp))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._real.get(block, timeout)


def tap_rtp_arrivals(receiver: RTCRtpReceiver, sink: EncodedSink) -> None:
    """Test clients only: each RTP packet's payload (one Opus packet) and RTP timestamp go to
    `sink` as the packet arrives, after SRTP and before aiortc's jitter buffer (which holds
    audio back ~80 ms), so a client can time what it receives; aiortc then handles it as
    before."""
    original = getattr(receiver, "_handle_rtp_packet", None)
    if original is None:
        raise CompatError("aiortc.RTCRtpReceiver._handle_rtp_packet is gone")

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        sink(bytes(packet.payload), int(packet.timestamp))
        await original(packet, arrival_time_ms)

    setattr(receiver, "_handle_rtp_packet", handle)  # noqa: B010 (shadowing on purpose)


def tap_encoded_audio(receiver: RTCRtpReceiver, sink: EncodedSink) -> None:
    """Test clients only: the peer's Opus packets reach `sink` undecoded (call before the
    receiver starts, i.e. before setLocalDescription), so many clients in one process count
    what they receive without decoding it. The transceiver's own audio never reaches
    aiortc's receiver (rtp.py takes it at the mux)."""
    name = "_RTCRtpReceiver__decoder_queue"
    real = getattr(receiver, name, None)
    if not isinstance(real, queue.Queue):
        raise CompatError(f"aiortc.RTCRtpReceiver.{name[15:]} is gone")
    setattr(receiver, name, _DecoderQueueTap(real, sink))


# (sequence, RTP timestamp, payload, loop time of arrival)
RtpPacketSink = Callable[[int, int, bytes, float], None]


def tap_rtp_packets(receiver: RTCRtpReceiver, sink: RtpPacketSink) -> None:
    """Test clients only: every SRTP-decrypted RTP packet of `receiver` reaches `sink` as it
    arrives, before aiortc's jitter buffer (which hands an audio packet on only once the
    next one has come), by wrapping `RTCRtpReceiver._handle_rtp_packet`."""
    handle = getattr(receiver, "_handle_rtp_packet", None)
    if handle is None:
        raise CompatError("aiortc.RTCRtpReceiver._handle_rtp_packet is gone")

    async def tapped(packet: Any, arrival_time_ms: int) -> None:
        now = asyncio.get_running_loop().time()
        sink(int(packet.sequence_number), int(packet.timestamp), bytes(packet.payload), now)
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = tapped  # type: ignore[method-assign]


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
    certificate = aiortc.RTCCertificate.generateCertificate()
    dtls = aiortc.RTCDtlsTransport(aiortc.RTCIceTransport(gatherer), [certificate])
    sctp = aiortc.RTCSctpTransport(dtls)
    for name in SCTP_QUEUE_ATTRIBUTES:
        if not hasattr(sctp, name):
            raise CompatError(f"aiortc.RTCSctpTransport.{name} is gone: update aiortc_compat.py")
    transceiver = pc.addTransceiver("audio")
    receiver = transceiver.receiver
    for name in SENDER_REPORT_ATTRIBUTES:
        if not isinstance(getattr(transceiver.sender, name, None), int):
            raise CompatError(f"aiortc.RTCRtpSender.{name[13:]} is gone: update aiortc_compat.py")
    for name in SENDER_RTT_ATTRIBUTES:
        if not hasattr(transceiver.sender, name):
            raise CompatError(f"aiortc.RTCRtpSender.{name[13:]} is gone: update aiortc_compat.py")
    for name in ("_handle_rtcp_packet", "_ssrc"):
        if not hasattr(transceiver.sender, name):
            raise CompatError(f"aiortc.RTCRtpSender.{name} is gone: update aiortc_compat.py")
    for name in DTLS_ATTRIBUTES:
        if not hasattr(transceiver.sender.transport, name):
            raise CompatError(f"aiortc.RTCDtlsTransport.{name} is gone: update aiortc_compat.py")
    for name in RECEIVER_REPORT_ATTRIBUTES:
        if not isinstance(getattr(receiver, name, None), dict):
            raise CompatError(f"aiortc.RTCRtpReceiver.{name[15:]} is gone: update aiortc_compat.py")
    for name in RECEIVER_ATTRIBUTES:
        if not isinstance(getattr(receiver, name, None), queue.Queue):
            raise CompatError(f"aiortc.RTCRtpReceiver.{name} is gone: update aiortc_compat.py")
    if not callable(getattr(receiver, "_handle_rtp_packet", None)):  # tap_rtp_packets
        raise CompatError("aiortc.RTCRtpReceiver._handle_rtp_packet is gone")
    for name in ("query_consent", "build_request", "remote_password"):
        if not hasattr(connection, name):
            raise CompatError(f"aioice.Connection.{name} is gone: update aiortc_compat.py")
    for method in ("connection_made", "datagram_received", "connection_lost", "send_stun"):
        if not hasattr(aioice.ice.StunProtocol, method):
            raise CompatError(f"aioice.ice.StunProtocol.{method} is gone")


# ---- our own RTP path (services/transceiver/rtp.py)


class SrtpSessions(NamedTuple):
    inbound: pylibsrtp.Session  # unprotects the caller's SRTP
    outbound: pylibsrtp.Session  # protects our SRTP and SRTCP (receiver reports)


def _audio(pc: RTCPeerConnection) -> Any:
    """The peer connection's one audio RTCRtpTransceiver (the session checked the offer)."""
    (audio,) = [t for t in pc.getTransceivers() if t.kind == "audio"]
    return audio


def srtp_sessions(pc: RTCPeerConnection) -> SrtpSessions:
    """The audio stream's (BUNDLEd) DTLS transport's SRTP sessions, keyed once DTLS
    connected. pylibsrtp's, in C; the same sessions aiortc uses for RTCP, on the same loop."""
    dtls = _audio(pc).sender.transport
    rx = getattr(dtls, "_rx_srtp", None)
    tx = getattr(dtls, "_tx_srtp", None)
    if rx is None or tx is None:
        raise CompatError("aiortc RTCDtlsTransport._rx_srtp/_tx_srtp are gone or not keyed yet")
    return SrtpSessions(rx, tx)


def last_sender_report(pc: RTCPeerConnection, ssrc: int) -> tuple[int, int]:
    """(LSR, DLSR) for a receiver report on `ssrc` (RFC 3550 §6.4.1): aiortc's receiver
    keeps the caller's last sender report (its RTCP still goes through aiortc); (0, 0)
    before the first one."""
    receiver = _audio(pc).receiver
    lsr: dict[int, int] = getattr(receiver, RECEIVER_REPORT_ATTRIBUTES[0], {})
    lsr_time: dict[int, float] = getattr(receiver, RECEIVER_REPORT_ATTRIBUTES[1], {})
    if ssrc not in lsr or ssrc not in lsr_time:
        return 0, 0
    delay = time.time() - lsr_time[ssrc]
    return lsr[ssrc], int(delay * 65536) if 0 < delay < 65536 else 0


NTP_EPOCH_OFFSET_S = 2208988800  # 1900-01-01 to 1970-01-01 (RFC 5905 §6)


def sender_report_sink(pc: RTCPeerConnection) -> Callable[[int, int, int], None]:
    """What aiortc's RTCRtpSender puts in its RTCP sender reports (RFC 3550 §6.4.1) comes
    from its own RTP loop; ours sends instead, so it records the same four values here."""
    sender = _audio(pc).sender
    ntp, rtp_ts, packets_name, octets_name = SENDER_REPORT_ATTRIBUTES

    def record(rtp_timestamp: int, packets: int, octets: int) -> None:
        setattr(sender, ntp, int((time.time() + NTP_EPOCH_OFFSET_S) * 4294967296.0))
        setattr(sender, rtp_ts, rtp_timestamp)
        setattr(sender, packets_name, packets)
        setattr(sender, octets_name, octets)

    return record


@dataclass(frozen=True)
class ReceiverReport:
    """One report block the caller sent on our audio stream (RFC 3550 §6.4.1)."""

    fraction_lost: int  # lost since its previous report, in 1/256
    jitter_ticks: int  # interarrival jitter, in RTP clock ticks
    rtt_s: float | None  # None without a matching LSR (no sender report of ours seen yet)


def tap_receiver_reports(
    pc: RTCPeerConnection,
    sink: Callable[[ReceiverReport], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Every report block about our audio that reaches aiortc's RTCRtpSender (RR or SR,
    routed by its SSRC) goes to `sink` too, after aiortc has handled it. The RTT is that
    block's alone, as aiortc computes it before smoothing: arrival minus the time our sender
    report with that LSR left, minus the caller's DLSR."""
    sender = _audio(pc).sender
    original = sender._handle_rtcp_packet
    lsr_name, lsr_time_name = SENDER_RTT_ATTRIBUTES

    async def handle(packet: Any) -> None:
        ours = [r for r in getattr(packet, "reports", ()) if r.ssrc == sender._ssrc]
        # Read before aiortc's handler: a sender report it sends meanwhile moves them.
        lsr, lsr_time = getattr(sender, lsr_name), getattr(sender, lsr_time_name)
        arrival = clock()
        await original(packet)
        for report in ours:
            rtt: float | None = None
            if lsr is not None and lsr_time is not None and report.lsr == lsr and report.dlsr:
                rtt = arrival - lsr_time - report.dlsr / 65536
            sink(ReceiverReport(report.fraction_lost, report.jitter, rtt))

    sender._handle_rtcp_packet = handle


def nominated_remote(connection: aioice.Connection) -> tuple[str, int] | None:
    """The client address of the selected pair (component 1), or None before nomination."""
    pair = connection._nominated.get(1)
    return None if pair is None else pair.remote_addr


# ---- load generator only (tests/bench/transceiver/saturation.py)

RtpSink = Callable[[bytes], None]


def tap_rtp_datagrams(transport: asyncio.BaseTransport, sink: RtpSink) -> None:
    """Load generators only: SRTP datagrams (RTP, not RTCP; RFC 5761 §4 demux, RFC 7983
    first-byte ranges) reaching `transport`'s aioice protocol go to `sink` still encrypted
    (the RTP header is clear text, RFC 3711 §3.1) instead of through aiortc's unprotect,
    parse and jitter buffer; STUN, DTLS and RTCP go on as before."""
    protocol = transport.get_protocol()
    original = protocol.datagram_received  # type: ignore[attr-defined]

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        if is_rtp(data):
            sink(data)
        else:
            original(data, addr)

    protocol.datagram_received = datagram_received  # type: ignore[attr-defined]
