"""One WebRTC session: an aiortc peer connection on the shared socket, its bridge stream,
and a lifecycle that ends exactly once with a recorded reason."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from libs.observability.telemetry import log_event
from services.transceiver import aiortc_compat, rtp, sdp
from services.transceiver.bridge import (
    BatchedBridge,
    BatchedLink,
    BatchingUnsupportedError,
    BridgeEndedError,
    BridgeError,
    BridgeLink,
    opus_format,
    pcm_format,
)
from services.transceiver.media import (
    OPUS_SAMPLES_PER_FRAME,
    EncoderOptions,
    IdleTrack,
    OpusToPcm,
    Playout,
    frame_samples,
)
from services.transceiver.realtime_events import SIDEBAND_BACKLOG_MAX, RealtimeEvents
from services.transceiver.udpmux import MuxSession, UdpMux
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

logger = logging.getLogger("voiceedge.transceiver.session")

DATA_CHANNEL_LABEL = "oai-events"
MAX_CONCEALED_FRAMES = 5  # 100 ms of PLC at most; a longer gap stays a gap
REPORT_EVERY_FRAMES = 50  # one RTCP receiver report per second of 20 ms ticks
PENDING_EVENTS_MAX = 256
BRIDGE_OPEN_TIMEOUT_S = 5.0

CR = common_pb2
ST = transceiver_pb2


@dataclass(frozen=True)
class SessionParams:
    """Everything a session needs, resolved from the request and the settings."""

    session_id: str
    ufrag: str
    pwd: str
    endpoints: tuple[tuple[str, int], ...]
    ice_timeout_s: float
    bridge_address: str
    rate_hz: int
    prebuffer_frames: int
    max_queued_frames: int
    opus_passthrough: bool = False
    bridge_batching: bool = False  # StreamSessions (one batched stream per bridge)
    encoder: EncoderOptions = field(default_factory=EncoderOptions)
    metadata: dict[str, str] = field(default_factory=dict)
    session_config: struct_pb2.Struct | None = None


class Sideband:
    """One reader of a session's server events (TransceiverService.StreamSessionEvents):
    a bounded queue; None marks the end (session closed, or the reader fell behind)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(SIDEBAND_BACKLOG_MAX + 1)
        self.behind = False
        self._ended = False

    def put(self, text: str) -> bool:
        """False (and the stream ends) when the reader is SIDEBAND_BACKLOG_MAX behind."""
        if self._ended:
            return False
        if self._queue.qsize() >= SIDEBAND_BACKLOG_MAX:
            self.behind = True
            self.end()
            return False
        self._queue.put_nowait(text)
        return True

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(None)

    async def get(self) -> str | None:
        return await self._queue.get()


class Session:
    def __init__(
        self,
        params: SessionParams,
        mux: UdpMux,
        channel_for: Callable[[str], grpc.aio.Channel],
        on_closed: Callable[[Session], None],
        pacer: rtp.Pacer,
        batched_for: Callable[[str], BatchedBridge] | None = None,
    ) -> None:
        self.params = params
        self._pacer = pacer
        self._batched_for = batched_for
        self.id = params.session_id
        self._mux = mux
        self._channel_for = channel_for
        self._on_closed = on_closed
        self._state: int = ST.SESSION_STATE_NEW
        self.created_at = time.time()
        self._created_mono = time.monotonic()
        self.close_reason: int = CR.CLOSE_REASON_UNSPECIFIED
        self.close_detail = ""
        self.closed_at: float | None = None
        self.ttfa_in_ms = 0.0
        self.ttfa_out_ms = 0.0
        self.frames_in = 0
        self.frames_out = 0
        self.final_info: ST.SessionInfo | None = None
        self._ice_connected = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._teardown: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._bridge: BridgeLink | BatchedLink | None = None
        self._channel: RTCDataChannel | None = None
        self._pending_events: list[str] = []  # server events until the channel opens
        # Client events until the bridge accepted, with where their replies go.
        self._client_backlog: list[tuple[str, Sideband | None]] = []
        self._sidebands: set[Sideband] = set()
        config = params.session_config
        self._events = RealtimeEvents(
            self.id, json_format.MessageToDict(config) if config is not None else None
        )
        self._mux_session: MuxSession | None = None
        self._decoder = OpusToPcm(params.rate_hz)
        self._pcm_frame_samples = frame_samples(params.rate_hz)
        self._passthrough = False
        self._connection: Any = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._idle_track = IdleTrack()
        self._rtp_params: sdp.AudioRtpParams | None = None
        self._rtp_in: rtp.RtpReceiver | None = None
        self._rtp_out: rtp.RtpSender | None = None
        self._protect_rtcp: Callable[[bytes], bytes] | None = None
        self._remote: tuple[str, int] | None = None  # the selected pair's client address
        # Receiver reports once a second (RFC 3550 §6.2 allows 5 s; WebRTC sends ~1 s),
        # spread over the pacer's ticks.
        self._report_phase = random.randrange(REPORT_EVERY_FRAMES)
        self.playout = Playout(
            params.rate_hz,
            prebuffer=params.prebuffer_frames,
            max_frames=params.max_queued_frames,
            on_first_audio=self._first_audio_out,
            encoder=params.encoder,
        )

    @property
    def state(self) -> int:
        """NEW until the first ICE check arrives through a relay, then CONNECTING."""
        mux_session = self._mux_session
        if self._state == ST.SESSION_STATE_NEW and mux_session and mux_session.counters.packets_in:
            return ST.SESSION_STATE_CONNECTING
        return self._state

    # ---- set-up

    async def negotiate(self, offer_sdp: str) -> str:
        """Offer in, answer out (raises sdp.SdpError for an unusable offer). The answer
        carries our ICE credentials and the relay endpoints as its only candidates."""
        stripped = sdp.strip_candidates(offer_sdp)
        pc = self.pc
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("iceconnectionstatechange", self._on_ice_state)
        pc.on("datachannel", self._on_datachannel)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(stripped, "offer"))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise sdp.SdpError(f"offer_sdp: {exc}") from None
        await aiortc_compat.let_early_connect_return(pc)
        transports = aiortc_compat.ice_transports(pc)
        if len(transports) != 1:
            raise sdp.SdpError(
                f"offer_sdp: {len(transports)} ICE transports; the offer must BUNDLE everything"
            )
        connection = aiortc_compat.connection_of(transports[0])
        aiortc_compat.set_local_credentials(connection, self.params.ufrag, self.params.pwd)
        aiortc_compat.install_consent_freshness(connection)
        # NAT rebinding (issue 12): the RTP path re-reads the pair at once, not at the tick.
        aiortc_compat.install_follow_client(
            connection, on_move=lambda: setattr(self, "_remote", None)
        )
        local = self.params.endpoints[0]
        self._mux_session = self._mux.register(self.params.ufrag, self.params.pwd, local)
        protocol = aiortc_compat.make_stun_protocol(connection)
        transport = self._mux.transport_for(self._mux_session, protocol)
        aiortc_compat.install_protocol(connection, protocol, transport, local[0], local[1])
        self._connection = connection
        audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise sdp.SdpError("offer_sdp: no audio m-line")
        audio[0].sender.replaceTrack(self._idle_track)
        audio[0].direction = "sendrecv"
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        self._rtp_params = sdp.audio_rtp_params(pc.localDescription.sdp)
        self._spawn(self._ice_timer())
        return sdp.rewrite_answer(pc.localDescription.sdp, self.params.endpoints)

    # ---- helpers

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _elapsed_ms(self) -> float:
        return (time.monotonic() - self._created_mono) * 1000.0

    def _first_audio_out(self) -> None:
        self.ttfa_out_ms = self._elapsed_ms()

    # ---- aiortc events

    async def _ice_timer(self) -> None:
        await asyncio.sleep(self.params.ice_timeout_s)
        if not self._ice_connected:
            self.close(CR.CLOSE_REASON_ICE_TIMEOUT, f"no ICE within {self.params.ice_timeout_s}s")

    def _on_ice_state(self) -> None:
        state = self.pc.iceConnectionState
        if state == "completed":
            self._ice_connected = True
        elif state == "failed":
            if self._ice_connected:
                self.close(CR.CLOSE_REASON_CONSENT_LOST, "ICE consent expired (RFC 7675)")
            else:
                self.close(CR.CLOSE_REASON_ICE_FAILED, "ICE checks failed")

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.state != ST.SESSION_STATE_CONNECTED:
            if self._teardown is None:
                self._state = ST.SESSION_STATE_CONNECTED
                log_event(logger, "session.connected", session__id=self.id)
                self._start_rtp()
                self._spawn(self._run_bridge())
        elif state == "failed":
            if self.pc.iceConnectionState == "failed":
                self._on_ice_state()
            else:
                self.close(CR.CLOSE_REASON_DTLS_FAILED, "DTLS transport failed")
        elif state == "closed":
            if (
                self._ice_connected
                and self._connection is not None
                and aiortc_compat.consent_expired(self._connection)
            ):
                self.close(CR.CLOSE_REASON_CONSENT_LOST, "ICE consent expired (RFC 7675)")
            else:
                self.close(CR.CLOSE_REASON_CLIENT_HANGUP, "peer connection closed by the client")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != DATA_CHANNEL_LABEL:
            return
        self._channel = channel

        def on_message(message: str | bytes) -> None:
            if isinstance(message, str):
                self.client_event(message)

        def on_open() -> None:
            self._flush_events()

        channel.on("message", on_message)
        channel.on("open", on_open)
        self._flush_events()

    def client_event(self, text: str, sender: Sideband | None = None) -> None:
        """One client event from the data channel (sender None) or a sideband: handled
        by the event protocol (realtime_events.py) once the bridge has accepted."""
        bridge = self._bridge
        if self._closing_or_closed:
            return
        if bridge is None or bridge.accepted is None:
            if len(self._client_backlog) < PENDING_EVENTS_MAX:
                self._client_backlog.append((text, sender))
            return
        outcome = self._events.from_client(text)
        if outcome.clear_playout:
            dropped = self.playout.clear()
            log_event(logger, "session.output_cleared", session__id=self.id, frames_dropped=dropped)
        for event in outcome.broadcast:
            self._send_event(event)
        for event in outcome.reply:
            if sender is None:
                self._send_to_channel(event)
            else:
                sender.put(event)
        if outcome.to_bridge is not None:
            bridge.send_event(outcome.to_bridge)

    def attach_sideband(self) -> Sideband:
        """A reader of every server event from now on, starting with `session.created`
        (once the bridge has accepted; before that the first one sent is it)."""
        sideband = Sideband()
        if self._closing_or_closed:
            sideband.end()
            return sideband
        self._sidebands.add(sideband)
        if self._bridge is not None and self._bridge.accepted is not None:
            sideband.put(self._events.session_created())
        return sideband

    def detach_sideband(self, sideband: Sideband) -> None:
        self._sidebands.discard(sideband)

    def _send_event(self, text: str) -> None:
        """A server event for the caller and every sideband."""
        for sideband in list(self._sidebands):
            if not sideband.put(text):
                self._sidebands.discard(sideband)
                log_event(logger, "session.sideband_behind", session__id=self.id)
        self._send_to_channel(text)

    def _send_to_channel(self, text: str) -> None:
        if len(self._pending_events) < PENDING_EVENTS_MAX:
            self._pending_events.append(text)
        self._flush_events()

    def _flush_events(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        pending, self._pending_events = self._pending_events, []
        for text in pending:
            channel.send(text)

    # ---- media

    def _start_rtp(self) -> None:
        """DTLS keyed SRTP: audio RTP leaves aiortc's per-packet path for ours (rtp.py)."""
        params = self._rtp_params
        mux_session = self._mux_session
        if params is None or mux_session is None:
            return
        srtp = aiortc_compat.srtp_sessions(self.pc)
        self._rtp_in = rtp.RtpReceiver(
            srtp.inbound, params.payload_type, self._on_caller_opus, on_loss=self._on_caller_loss
        )
        mux_session.rtp_sink = self._rtp_in.datagram
        self._rtp_out = rtp.RtpSender(
            params, srtp.outbound, self._send_media, aiortc_compat.sender_report_sink(self.pc)
        )
        self._protect_rtcp = srtp.outbound.protect_rtcp
        self._pacer.add(self)

    def tick(self, frame_index: int) -> None:
        """The pacer's 20 ms clock: send the next outbound packet (audio or silence)."""
        sender = self._rtp_out
        if sender is not None and self._teardown is None:
            playout = self.playout
            played_before = playout.frames_played
            sender.send(playout.next_packet(), frame_index, OPUS_SAMPLES_PER_FRAME)
            events = self._events
            played = playout.frames_played != played_before
            if played != events.output_active or (played and events.idle_ticks):
                event = events.playout(played)
                if event is not None:
                    self._send_event(event)
            if frame_index % REPORT_EVERY_FRAMES == self._report_phase:
                self._remote = None  # re-read the selected pair (aioice may switch it)
                self._send_receiver_report()

    def _send_receiver_report(self) -> None:
        """RTCP RR on the caller's stream: aiortc's receiver no longer sees our RTP, and the
        caller's encoder adapts to the loss it reports (RFC 3550 §6.4.2)."""
        receiver, params, protect = self._rtp_in, self._rtp_params, self._protect_rtcp
        if receiver is None or params is None or protect is None:
            return
        source = receiver.source_ssrc
        if source is None:
            return
        lsr, dlsr = aiortc_compat.last_sender_report(self.pc, source)
        report = receiver.receiver_report(params.ssrc, lsr, dlsr)
        if report is not None:
            self._send_media(protect(report))

    def _send_media(self, data: bytes) -> None:
        remote = self._remote
        if remote is None:
            # The selected pair, looked up again once a second (tick) rather than per packet.
            remote = self._remote = aiortc_compat.nominated_remote(self._connection)
        if remote is not None and self._mux_session is not None:
            self._mux.send(self._mux_session, remote, data)

    def _on_caller_loss(self, packets: int) -> None:
        """Caller packets that never came (a sequence gap): PCM bridges get libopus packet
        loss concealment for up to MAX_CONCEALED_FRAMES of them, the rest (and every lost
        frame in passthrough) a gap in AudioFrame.sequence, as inference.proto says."""
        bridge = self._bridge
        if self._closing_or_closed or bridge is None or bridge.accepted is None:
            return
        if self._passthrough:
            bridge.skip_audio(packets, OPUS_SAMPLES_PER_FRAME)
            return
        samples = self._pcm_frame_samples
        concealed = self._decoder.conceal(min(packets, MAX_CONCEALED_FRAMES))
        for chunk in concealed:
            bridge.send_audio(chunk, samples)
            self.frames_in += 1
        if packets > len(concealed):
            bridge.skip_audio(packets - len(concealed), samples)

    def _on_caller_opus(self, packet: bytes, rtp_timestamp: int) -> None:
        """One Opus packet from the caller (rtp.RtpReceiver: in order, late ones dropped)."""
        if self._closing_or_closed:
            return
        if not self.ttfa_in_ms:
            self.ttfa_in_ms = self._elapsed_ms()
        bridge = self._bridge
        if bridge is None or bridge.accepted is None:
            return  # the bridge is not listening yet
        if self._passthrough:
            bridge.send_audio(packet, OPUS_SAMPLES_PER_FRAME)
            self.frames_in += 1
            return
        samples = self._pcm_frame_samples
        for chunk in self._decoder.push(packet):
            bridge.send_audio(chunk, samples)
            self.frames_in += 1

    async def _run_bridge(self) -> None:
        address = self.params.bridge_address
        start = inference_pb2.SessionStart(
            session_id=self.id,
            input_format=opus_format()
            if self.params.opus_passthrough
            else pcm_format(self.params.rate_hz),
            metadata=self.params.metadata,
            opus_passthrough=self.params.opus_passthrough,
        )
        if self.params.session_config is not None:
            start.session_config.CopyFrom(self.params.session_config)
        link: BridgeLink | BatchedLink
        batched = self._batched_for(address) if self._batched_for is not None else None
        if not self.params.bridge_batching or batched is None or batched.unimplemented:
            batched = None
        try:
            if batched is not None:
                link = self._bridge = BatchedLink(batched, self.id)
                try:
                    await link.open(start, BRIDGE_OPEN_TIMEOUT_S)
                except BatchingUnsupportedError:
                    log_event(logger, "session.bridge_unbatched", session__id=self.id)
                    batched = None
            if batched is None:
                link = self._bridge = BridgeLink(self._channel_for(address), address)
                await link.open(start, BRIDGE_OPEN_TIMEOUT_S)
        except BridgeError as exc:
            self.close(CR.CLOSE_REASON_BRIDGE_ERROR, str(exc))
            return
        accepted = link.accepted
        if accepted is not None and accepted.opus_passthrough and self.params.opus_passthrough:
            self._passthrough = True
            self.playout.passthrough = True
        elif accepted is not None and accepted.output_format.sample_rate_hz:
            self.playout.set_rate(accepted.output_format.sample_rate_hz)
        log_event(logger, "session.bridge_open", session__id=self.id, bridge=address)
        if accepted is not None:
            defaults = (
                json_format.MessageToDict(accepted.session_defaults)
                if accepted.HasField("session_defaults")
                else None
            )
            for event in self._events.accepted(accepted.sends_session_events, defaults):
                self._send_event(event)
        backlog, self._client_backlog = self._client_backlog, []
        for text, sender in backlog:
            self.client_event(text, sender)
        try:
            await link.read_loop(self._on_bridge_message)
        except BridgeEndedError as exc:
            self.close(CR.CLOSE_REASON_BRIDGE_ENDED, exc.detail)
        except BridgeError as exc:
            self.close(CR.CLOSE_REASON_BRIDGE_ERROR, str(exc))

    def _on_bridge_message(self, message: inference_pb2.StreamSessionResponse) -> None:
        kind = message.WhichOneof("payload")
        if kind == "audio_frame":
            self.playout.push(message.audio_frame.data)
            self.frames_out += 1
            return
        if kind == "clear":
            dropped = self.playout.clear()
            log_event(logger, "session.barge_in", session__id=self.id, frames_dropped=dropped)
            for event in self._events.cleared_by_bridge(dropped):
                self._send_event(event)
            return
        for event in self._events.from_bridge(message):
            self._send_event(event)

    # ---- lifecycle

    @property
    def _closing_or_closed(self) -> bool:
        return self._teardown is not None

    @property
    def is_closed(self) -> bool:
        return self._teardown is not None

    def close(self, reason: int, detail: str = "") -> asyncio.Task[None]:
        """Ends the session once; later calls return the same teardown task."""
        if self._teardown is None:
            self.close_reason = reason
            self.close_detail = detail
            self._teardown = asyncio.get_running_loop().create_task(self._close(reason, detail))
        return self._teardown

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _close(self, reason: int, detail: str) -> None:
        try:
            info = await self._snapshot()
        except Exception:  # stats are best effort; closing must not fail
            info = ST.SessionInfo(session_id=self.id)
        if self._bridge is not None:
            # Before cancelling the reader: cancelling a pending read cancels the whole call,
            # and the bridge should hear SessionEnd with our reason.
            ended_by_bridge = reason in (
                CR.CLOSE_REASON_BRIDGE_ENDED,
                CR.CLOSE_REASON_BRIDGE_ERROR,
            )
            await self._bridge.close(reason, detail, notify=not ended_by_bridge)
        self._pacer.remove(self)
        for sideband in self._sidebands:
            sideband.end()
        self._sidebands.clear()
        if self._mux_session is not None:
            self._mux_session.rtp_sink = None
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._idle_track.stop()
        await self.pc.close()
        await aiortc_compat.wait_pc_closed(self.pc)
        if self._mux_session is not None:
            self._mux.unregister(self._mux_session)
        self.closed_at = time.time()
        self._state = ST.SESSION_STATE_CLOSED
        info.state = ST.SESSION_STATE_CLOSED
        info.stats.close_reason = reason  # type: ignore[assignment]
        info.stats.closed_at.CopyFrom(_timestamp(self.closed_at))
        info.stats.ice_state = "closed"
        info.stats.dtls_state = "closed"
        self.final_info = info
        log_event(
            logger,
            "session.closed",
            session__id=self.id,
            close__reason=CR.CloseReason.Name(reason),  # type: ignore[arg-type]
            detail=detail,
            duration_ms=round(self._elapsed_ms()),
            audio_frames_in=self.frames_in,
            audio_frames_out=self.frames_out,
            **self._rtp_drops(),
        )
        self._closed.set()
        self._on_closed(self)

    # ---- stats

    def _rtp_drops(self) -> dict[str, int]:
        """Caller RTP our path did not use, by reason (for the close log)."""
        if self._rtp_in is None:
            return {}
        s = self._rtp_in.stats
        return {
            "rtp__dropped_srtp": s.dropped_srtp,
            "rtp__dropped_late": s.dropped_late,
            "rtp__dropped_malformed": s.dropped_malformed,
            "rtp__dropped_payload_type": s.dropped_payload_type,
        }

    async def info(self) -> ST.SessionInfo:
        if self.final_info is not None:
            return self.final_info
        return await self._snapshot()

    async def _snapshot(self) -> ST.SessionInfo:
        stats = common_pb2.SessionStats(
            ice_state=self.pc.iceConnectionState,
            time_to_first_audio_in_ms=self.ttfa_in_ms,
            time_to_first_audio_out_ms=self.ttfa_out_ms,
            audio_frames_in=self.frames_in,
            audio_frames_out=self.frames_out,
            close_reason=self.close_reason,  # type: ignore[arg-type]
        )
        stats.created_at.CopyFrom(_timestamp(self.created_at))
        transceivers = self.pc.getTransceivers()
        if transceivers:
            stats.dtls_state = transceivers[0].receiver.transport.state
        if self._connection is not None:
            pair = aiortc_compat.selected_pair(self._connection)
            if pair is not None:
                stats.selected_local_address.ip, stats.selected_local_address.port = pair.local
                stats.selected_remote_address.ip, stats.selected_remote_address.port = pair.remote
        if self._mux_session is not None:
            counters = self._mux_session.counters
            stats.bytes_received = counters.bytes_in
            stats.bytes_sent = counters.bytes_out
        if self._rtp_in is not None:
            received = self._rtp_in.stats
            stats.packets_received = received.packets
            stats.packets_lost = self._rtp_in.lost
            stats.jitter_ms = received.jitter_ms
        if self._rtp_out is not None:
            stats.packets_sent = self._rtp_out.packets
        if self.pc.connectionState != "closed":
            # RTT: aiortc's RTCP (our sender reports, the caller's receiver reports).
            report = await self.pc.getStats()
            for entry in report.values():
                if getattr(entry, "type", "") == "remote-inbound-rtp":
                    stats.rtt_ms = float(entry.roundTripTime or 0.0) * 1000.0
                    stats.loss_fraction = float(entry.fractionLost or 0) / 256.0
        return ST.SessionInfo(
            session_id=self.id,
            state=self.state,  # type: ignore[arg-type]
            stats=stats,
            metadata=self.params.metadata,
            ice_ufrag=self.params.ufrag,
            bridge_address=self._bridge.address if self._bridge is not None else "",
        )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def endpoints_of(addresses: Sequence[common_pb2.SocketAddress]) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for address in addresses:
        if not address.ip or not 1 <= address.port <= 65535:
            raise sdp.SdpError(f"relay_endpoints: bad address {address.ip!r}:{address.port}")
        out.append((address.ip, int(address.port)))
    if not out:
        raise sdp.SdpError("relay_endpoints: at least one is required")
    return tuple(out)
