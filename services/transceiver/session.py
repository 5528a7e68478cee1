"""One WebRTC session: the coordinator of an aiortc peer connection on the shared socket,
its audio both ways, its events and its bridge stream. It feeds what happens to its
lifecycle (lifecycle.py, which decides the phase and the close reason once) and acts on
what that returns; the jobs themselves are its collaborators':

- `RtpPath` (rtp_path.py): audio RTP on our own path, receiver reports;
- `CallerAudio` (media.py): caller Opus -> the bridge; `Playout` (media.py): bridge -> caller;
- `ServerEvents` (sideband.py): the data channel and the sideband readers;
- `RealtimeEvents` (realtime_events.py): the event protocol;
- `BridgeSession` (bridge.py): the bridge stream, batched or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from google.protobuf import json_format, struct_pb2

from libs.observability.telemetry import log_event
from libs.service.aio import timestamp
from services.transceiver import aiortc_compat, rtp, sdp
from services.transceiver.bridge import (
    BridgeEndedError,
    BridgeError,
    BridgeSession,
    BridgeStreams,
    open_bridge_session,
    opus_format,
    pcm_format,
)
from services.transceiver.call_metrics import InboundAudio
from services.transceiver.lifecycle import Action, Event, Lifecycle, Phase
from services.transceiver.media import (
    OPUS_CLOCK_HZ,
    CallerAudio,
    Cleared,
    EncoderOptions,
    IdleTrack,
    Playout,
)
from services.transceiver.realtime_events import RealtimeEvents
from services.transceiver.rtp_path import RtpPath
from services.transceiver.settings import SessionSettings
from services.transceiver.sideband import ServerEvents, Sideband
from services.transceiver.turn_timing import TurnTimer
from services.transceiver.udpmux import MuxSession, UdpMux
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2
from voiceedge.transceiver.v1 import transceiver_pb2

logger = logging.getLogger("voiceedge.transceiver.session")

CR = common_pb2
ST = transceiver_pb2

# Between attempts to reopen a broken bridge stream: the first wait, doubling up to the max
# (a restarted bridge is back within ~1.5 s here: the call should hear it soon after).
BRIDGE_RETRY_FIRST_S = 0.2
BRIDGE_RETRY_MAX_S = 0.5


@dataclass(frozen=True)
class SessionParams:
    """What one CreateSession asks for, resolved against the settings' defaults."""

    session_id: str
    ufrag: str
    pwd: str
    endpoints: tuple[tuple[str, int], ...]
    ice_timeout_s: float
    bridge_address: str
    rate_hz: int
    opus_passthrough: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    session_config: struct_pb2.Struct | None = None
    # The relays' ICE-TCP ports: tcptype passive candidates below the UDP ones (RFC 6544).
    tcp_endpoints: tuple[tuple[str, int], ...] = ()


class Session:
    def __init__(
        self,
        params: SessionParams,
        settings: SessionSettings,
        mux: UdpMux,
        bridges: BridgeStreams,
        pacer: rtp.Pacer,
        on_closed: Callable[[Session], None],
    ) -> None:
        self.params = params
        self.id = params.session_id
        self._settings = settings
        self._mux = mux
        self._bridges = bridges
        self._pacer = pacer
        self._on_closed = on_closed
        self._life = Lifecycle()
        self.created_at = time.time()
        self._created_mono = time.monotonic()
        self.closed_at: float | None = None
        self.ttfa_out_ms = 0.0
        self.frames_out = 0
        self.ice_restarts = 0
        self.answer_candidates: tuple[str, ...] = ()  # the answer's a=candidate lines
        self.final_info: ST.SessionInfo | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._teardown: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None  # the reconnect grace timer, if armed
        self._closed = asyncio.Event()
        self._bridge: BridgeSession | None = None
        # Client events until the bridge accepted, with where their replies go.
        self._client_backlog: list[tuple[str, Sideband | None]] = []
        self._server_events = ServerEvents(self.id, settings.pending_events_max)
        config = params.session_config
        self._events = RealtimeEvents(
            self.id, json_format.MessageToDict(config) if config is not None else None
        )
        self._mux_session: MuxSession | None = None
        self._rtp: RtpPath | None = None
        self._connection: Any = None
        self._rtp_params: sdp.AudioRtpParams | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.turns = TurnTimer()  # per-turn latency (turn_timing.py; call_metrics.py reads it)
        # The first-hop RTT geosteer hears (call_metrics.py; the manager wires it up).
        self.first_hop_rtt_ms: Callable[[], float] = lambda: 0.0
        self._idle_track = IdleTrack()
        self._caller_audio = CallerAudio(
            params.rate_hz, settings.concealment_max_frames, self._elapsed_ms, settings
        )
        self.playout = Playout(
            params.rate_hz,
            prebuffer=settings.jitter_buffer_frames,
            max_frames=settings.playout_queue_max_frames,
            on_first_audio=self._first_audio_out,
            encoder=EncoderOptions(settings.opus_application, settings.opus_complexity),
        )

    # ---- the lifecycle

    @property
    def state(self) -> int:
        """NEW until the first ICE check arrives through a relay, then CONNECTING."""
        self._note_checks()
        return self._life.public_state

    @property
    def close_reason(self) -> int:
        return self._life.close_reason

    @property
    def close_detail(self) -> str:
        return self._life.close_detail

    @property
    def is_closed(self) -> bool:
        """True from the moment the session decided to close."""
        return self._life.ended

    @property
    def ttfa_in_ms(self) -> float:
        return self._caller_audio.ttfa_in_ms

    @property
    def frames_in(self) -> int:
        return self._caller_audio.frames_in

    @property
    def frames_concealed(self) -> int:
        """Caller frames the bridge got as libopus PLC (CallerAudio counts the rest)."""
        return self._caller_audio.frames_concealed

    @property
    def frames_fec_recovered(self) -> int:
        """Lost caller frames recovered from the next packet's in-band FEC."""
        return self._caller_audio.frames_fec_recovered

    @property
    def inbound(self) -> InboundAudio:
        """The caller's audio on its way in, for the call record (call_metrics.py)."""
        stats = common_pb2.SessionStats()
        if self._rtp is not None:
            self._rtp.fill_stats(stats)
        audio = self._caller_audio
        return InboundAudio(
            packets=stats.packets_received,
            lost=stats.packets_lost,
            jitter_ms=stats.jitter_ms,
            # CallerAudio's receive path is being rewritten (branch rx): read them if there.
            frames_concealed=getattr(audio, "frames_concealed", 0),
            frames_fec_recovered=getattr(audio, "frames_fec_recovered", 0),
        )

    def _note_checks(self) -> None:
        # The mux counts packets per session; the first one is the client's ICE check.
        mux_session = self._mux_session
        if self._life.phase is Phase.NEW and mux_session and mux_session.counters.packets_in:
            self._life.feed(Event.CHECK_RECEIVED)

    def _feed(self, event: Event, detail: str = "", reason: int | None = None) -> None:
        self._note_checks()
        step = self._life.feed(event, detail, reason)
        if step.action is Action.START_MEDIA:
            log_event(logger, "session.connected", session__id=self.id)
            self._start_rtp()
            self._spawn(self._run_bridge())
        elif step.action is Action.TEAR_DOWN:
            self._caller_audio.stop()  # nothing more to the bridge from this turn on
            self._pacer.remove(self._caller_audio)
            self._teardown = asyncio.get_running_loop().create_task(self._close())
        elif step.action is Action.AWAIT_RESTART:
            self._arm_grace()
        elif step.action is Action.RESUME_MEDIA:
            self._resume()

    def close(self, reason: int, detail: str = "") -> asyncio.Task[None]:
        """Ends the session once (the first cause's reason stays); later calls return the
        same teardown task."""
        self._feed(Event.CLOSE_REQUESTED, detail, reason)
        assert self._teardown is not None
        return self._teardown

    async def wait_closed(self) -> None:
        await self._closed.wait()

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
        settings = self._settings
        aiortc_compat.install_consent_freshness(
            connection,
            interval_s=settings.consent_interval_s,
            expiry_s=settings.consent_expiry_s,
            retransmissions=settings.consent_retransmissions,
            on_expired=self._on_client_silent if settings.reconnect_grace_s > 0 else None,
        )
        local = self.params.endpoints[0]
        self._mux_session = self._mux.register(self.params.ufrag, self.params.pwd, local)
        if self._caller_audio.adaptive:  # first words: keep RTP that overtakes DTLS's end
            self._mux_session.early_rtp = []
        self._rtp = RtpPath(
            self._mux, self._mux_session, connection, settings.receiver_report_interval_frames
        )
        # NAT rebinding (issue 12): the RTP path re-reads the pair at once, not at the tick.
        aiortc_compat.install_follow_client(connection, on_move=self._on_path_moved)
        aiortc_compat.install_tcp_peers(connection, self._mux.tcp_clients.__contains__)
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
        local_sdp = pc.localDescription.sdp
        if self._caller_audio.adaptive:  # FEC and RED: only the adaptive path reads them
            local_sdp = sdp.tune_audio_answer(local_sdp, stripped, red=True)
        self._rtp_params = sdp.audio_rtp_params(local_sdp)
        self._spawn(self._ice_timer())
        answer_sdp = sdp.rewrite_answer(local_sdp, self.params.endpoints, self.params.tcp_endpoints)
        # Once: every BUNDLEd m-section of the answer repeats them.
        self.answer_candidates = tuple(
            dict.fromkeys(
                line for line in answer_sdp.split("\r\n") if line.startswith("a=candidate:")
            )
        )
        return answer_sdp

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _elapsed_ms(self) -> float:
        return (time.monotonic() - self._created_mono) * 1000.0

    def _first_audio_out(self) -> None:
        self.ttfa_out_ms = self._elapsed_ms()

    # ---- what aiortc and the timer report

    async def _ice_timer(self) -> None:
        await asyncio.sleep(self.params.ice_timeout_s)
        self._feed(Event.ICE_TIMEOUT, f"no ICE within {self.params.ice_timeout_s}s")

    def _on_ice_state(self) -> None:
        state = self.pc.iceConnectionState
        if state == "completed":
            self._feed(Event.ICE_COMPLETED)
        elif state == "failed":
            self._feed(Event.ICE_FAILED)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._feed(Event.DTLS_CONNECTED)
        elif state == "failed":
            if self.pc.iceConnectionState == "failed":
                self._feed(Event.ICE_FAILED)
            else:
                self._feed(Event.DTLS_FAILED)
        elif state == "closed":
            expired = self._connection is not None and aiortc_compat.consent_expired(
                self._connection
            )
            self._feed(Event.CONSENT_EXPIRED if expired else Event.PEER_CLOSED)

    def _on_path_moved(self) -> None:
        if self._rtp is not None:
            self._rtp.follow()
        if self._connection is not None:
            aiortc_compat.refresh_consent(self._connection)
        self._feed(Event.PATH_SELECTED)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self._server_events.attach_channel(channel, self.client_event)

    # ---- events

    def client_event(self, text: str, sender: Sideband | None = None) -> None:
        """One client event from the data channel (sender None) or a sideband: handled
        by the event protocol (realtime_events.py) once the bridge has accepted."""
        if self._life.ended:
            return
        bridge = self._bridge
        if bridge is None or bridge.accepted is None:
            if len(self._client_backlog) < self._settings.pending_events_max:
                self._client_backlog.append((text, sender))
            return
        outcome = self._events.from_client(text)
        cleared = None
        if outcome.clear_playout:
            cleared = self.playout.clear()
            self._log_clear("session.output_cleared", cleared)
        for event in outcome.broadcast:
            self._server_events.send(event)
        for event in outcome.reply:
            if sender is None:
                self._server_events.to_channel(event)
            else:
                sender.put(event)
        if outcome.to_bridge is not None:
            bridge.send_event(outcome.to_bridge)
        if cleared is not None:
            # After the client's clear itself: the bridge learns of the clear, then of what
            # the caller heard (inference.proto, PlayoutReport).
            bridge.send_report(cleared.report)

    def attach_sideband(self) -> Sideband:
        """A reader of every server event from now on, starting with `session.created`
        (once the bridge has accepted; before that the first one sent is it)."""
        if self._life.ended:
            sideband = Sideband()
            sideband.end()
            return sideband
        sideband = self._server_events.attach()
        if self._bridge is not None and self._bridge.accepted is not None:
            sideband.put(self._events.session_created())
        return sideband

    def detach_sideband(self, sideband: Sideband) -> None:
        self._server_events.detach(sideband)

    # ---- media

    def _start_rtp(self) -> None:
        params, path = self._rtp_params, self._rtp
        if params is None or path is None:
            return
        audio = self._caller_audio
        if audio.adaptive:  # the jitter buffer: packets in as they come, out on the pacer
            path.start(self.pc, params, audio.on_opus, audio.on_loss, on_packet=audio.on_packet)
            self._pacer.add(audio)
        else:
            path.start(self.pc, params, audio.on_opus, audio.on_loss)
        self._pacer.add(self)

    def tick(self, frame_index: int, due: float) -> None:
        """The pacer's 20 ms clock: send the next outbound packet (audio or silence)."""
        path = self._rtp
        if path is None or self._life.ended or self._life.reconnecting:
            return  # consent expired: nothing may be sent until the client is back
        playout = self.playout
        played_before = playout.frames_played
        path.send(playout.next_packet(), frame_index)
        events = self._events
        played = playout.frames_played != played_before
        if played:
            self.turns.played(playout)
        if played != events.output_active or (played and events.idle_ticks):
            event = events.playout(played)
            if event is not None:
                self._server_events.send(event)

    # ---- ICE restart and the reconnect grace

    def restart_ice(self, credentials: aiortc_compat.IceCredentials) -> None:
        """Moves the session to new ICE credentials (RFC 8445 §9) with its DTLS, data
        channel and bridge stream kept: the mux admits the client by the new server ufrag,
        aioice checks the new pair, and media follows once it is selected. Raises
        ValueError if the new ufrag belongs to another session."""
        mux_session, connection = self._mux_session, self._connection
        if self._life.ended or mux_session is None or connection is None:
            raise ValueError(f"session {self.id!r} is not open")
        self._mux.rekey(mux_session, credentials.local_ufrag, credentials.local_pwd)
        aiortc_compat.restart_ice(connection, credentials)
        previous = self.params.ufrag
        self.params = replace(self.params, ufrag=credentials.local_ufrag, pwd=credentials.local_pwd)
        self.ice_restarts += 1
        self._feed(Event.ICE_RESTARTED)
        log_event(
            logger,
            "session.ice_restarted",
            session__id=self.id,
            ice__ufrag=credentials.local_ufrag,
            previous_ufrag=previous,
            restarts=self.ice_restarts,
        )

    def _on_client_silent(self) -> None:
        self._feed(Event.CLIENT_SILENT, "ICE consent expired (RFC 7675)")

    def _arm_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
        grace_s = self._settings.reconnect_grace_s
        log_event(logger, "session.awaiting_restart", session__id=self.id, grace_s=grace_s)
        self._grace = self._spawn(self._grace_timer(grace_s))

    async def _grace_timer(self, grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        self._feed(Event.GRACE_EXPIRED, f"client silent, no ICE restart within {grace_s:g}s")

    def _resume(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        log_event(logger, "session.resumed", session__id=self.id, restarts=self.ice_restarts)

    # ---- the bridge

    def _hold_bridge(self, bridge: BridgeSession) -> None:
        # Closing from now on ends it at the bridge too; until it accepted, client events
        # wait in the backlog.
        self._bridge = bridge

    def _bridge_start(self, reconnect: bool) -> inference_pb2.SessionStart:
        params = self.params
        start = inference_pb2.SessionStart(
            session_id=self.id,
            input_format=opus_format() if params.opus_passthrough else pcm_format(params.rate_hz),
            metadata=params.metadata,
            opus_passthrough=params.opus_passthrough,
        )
        if reconnect:
            # A new stream starts a new agent: it gets the session as the caller has shaped
            # it since (session.update included), not only the one signaling first sent.
            start.session_config.update(self._events.session)
        elif params.session_config is not None:
            start.session_config.CopyFrom(params.session_config)
        return start

    async def _open_bridge(self, reconnect: bool = False) -> BridgeSession:
        """Opens the bridge stream and hands it caller audio; raises BridgeError."""
        params = self.params
        link = await open_bridge_session(
            self._bridges,
            self._settings,
            params.bridge_address,
            self._bridge_start(reconnect),
            self._hold_bridge,
        )
        accepted = link.accepted
        audio = self._caller_audio
        if accepted is not None and accepted.opus_passthrough and params.opus_passthrough:
            audio.passthrough = True
            self.playout.passthrough = True
        elif accepted is not None and accepted.output_format.sample_rate_hz:
            self.playout.set_rate(accepted.output_format.sample_rate_hz)
        audio.bridge = self.turns.tap(link, OPUS_CLOCK_HZ if audio.passthrough else params.rate_hz)
        return link

    async def _run_bridge(self) -> None:
        params = self.params
        try:
            link = await self._open_bridge()
        except BridgeError as exc:
            self._feed(Event.BRIDGE_FAILED, str(exc))
            return
        accepted = link.accepted
        log_event(logger, "session.bridge_open", session__id=self.id, bridge=params.bridge_address)
        if accepted is not None:
            defaults = (
                json_format.MessageToDict(accepted.session_defaults)
                if accepted.HasField("session_defaults")
                else None
            )
            for event in self._events.accepted(accepted.sends_session_events, defaults):
                self._server_events.send(event)
        while True:
            self._replay_client_backlog()
            try:
                await link.read_loop(self._on_bridge_message)
            except BridgeEndedError as exc:
                if exc.after_playout:
                    await self._play_out()
                self._feed(Event.BRIDGE_ENDED, exc.detail)
                return
            except BridgeError as exc:
                reopened = await self._reconnect_bridge(link, str(exc))
                if isinstance(reopened, str):
                    self._feed(Event.BRIDGE_FAILED, reopened)
                    return
                link = reopened
            else:
                # Closed by this side (teardown): a shared stream's session returns from
                # read_loop at once from then on, and looping would never yield again (a
                # transceiver spun at 100 % CPU when a call hung up right after its
                # bridge opened, in the regions benchmark).
                return

    def _replay_client_backlog(self) -> None:
        backlog, self._client_backlog = self._client_backlog, []
        for text, sender in backlog:
            self.client_event(text, sender)

    async def _reconnect_bridge(self, broken: BridgeSession, cause: str) -> BridgeSession | str:
        """The bridge stream broke: reopen it (a new SessionStart, so a new agent with the
        session's current configuration) until `bridge_reconnect_grace_s` runs out. Caller
        audio meanwhile is dropped and client events wait; playout goes on. Returns the new
        stream, or why the session has to end."""
        self._caller_audio.bridge = None
        self._bridge = None  # client events wait for the next stream's SessionAccepted
        await broken.close(CR.CLOSE_REASON_BRIDGE_ERROR, cause, notify=False)
        grace_s = self._settings.bridge_reconnect_grace_s
        log_event(
            logger,
            "session.bridge_lost",
            level=logging.WARNING,
            session__id=self.id,
            detail=cause,
            grace_s=grace_s,
        )
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        deadline = lost_at + grace_s
        delay_s = BRIDGE_RETRY_FIRST_S
        while loop.time() < deadline:
            try:
                link = await self._open_bridge(reconnect=True)
            except BridgeError as exc:
                cause = str(exc)
            else:
                log_event(
                    logger,
                    "session.bridge_reopened",
                    session__id=self.id,
                    bridge=self.params.bridge_address,
                    gap_ms=round((loop.time() - lost_at) * 1000),
                )
                return link
            await asyncio.sleep(max(0.0, min(delay_s, deadline - loop.time())))
            delay_s = min(delay_s * 2, BRIDGE_RETRY_MAX_S)
        return f"{cause} (not back within {grace_s:g} s)" if grace_s else cause

    def _on_bridge_message(self, message: inference_pb2.StreamSessionResponse) -> None:
        self.turns.bridge_message(message, self.playout)
        kind = message.WhichOneof("payload")
        playout = self.playout
        if kind == "audio_frame":
            frame = message.audio_frame
            full = playout.frames_dropped
            playout.push(frame.data, frame.sequence)
            self.frames_out += 1
            if playout.frames_dropped != full and not full:
                log_event(
                    logger,
                    "session.playout_full",
                    level=logging.WARNING,
                    session__id=self.id,
                    queue_max_s=self._settings.playout_queue_max_s,
                )
            return
        if kind == "clear":
            cleared = playout.clear()
            self._log_clear("session.barge_in", cleared)
            if self._bridge is not None:
                self._bridge.send_report(cleared.report)
            for event in self._events.cleared_by_bridge(cleared.frames_dropped):
                self._server_events.send(event)
            return
        if kind == "response_started":
            playout.start_response(message.response_started.response_id)
        elif kind == "response_done" and message.response_done.cancelled:
            playout.cancel_response()
        for event in self._events.from_bridge(message):
            self._server_events.send(event)

    def _log_clear(self, event: str, cleared: Cleared) -> None:
        report = cleared.report
        log_event(
            logger,
            event,
            session__id=self.id,
            frames_dropped=cleared.frames_dropped,
            response__id=report.response_id,
            played_ms=report.played_ms,
            discarded_frames=self.playout.frames_discarded,
        )

    async def _play_out(self) -> None:
        """The bridge ended the call after its last words (SessionEnd.after_playout): no
        more caller audio to it, and the queued response audio (its partial last frame
        padded) plays to the end, for at most `playout_drain_timeout_s`."""
        self._caller_audio.bridge = None
        playout = self.playout
        playout.flush()
        queued = playout.queued
        timeout_s = self._settings.playout_drain_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await playout.wait_drained()
        except TimeoutError:
            log_event(
                logger,
                "session.play_out_timeout",
                level=logging.WARNING,
                session__id=self.id,
                frames_left=playout.queued,
                timeout_s=timeout_s,
            )
        else:
            log_event(logger, "session.played_out", session__id=self.id, frames=queued)

    # ---- teardown

    async def _close(self) -> None:
        reason, detail = self._life.close_reason, self._life.close_detail
        try:
            info = await self._snapshot()
        except Exception:  # stats are best effort; closing must not fail
            info = ST.SessionInfo(session_id=self.id)
        await self._tell_caller(reason)
        if self._bridge is not None:
            # Before cancelling the reader: cancelling a pending read cancels the whole call,
            # and the bridge should hear SessionEnd with our reason.
            ended_by_bridge = reason in (
                CR.CLOSE_REASON_BRIDGE_ENDED,
                CR.CLOSE_REASON_BRIDGE_ERROR,
            )
            await self._bridge.close(reason, detail, notify=not ended_by_bridge)
        self._pacer.remove(self)
        self._server_events.end()
        if self._rtp is not None:
            self._rtp.stop()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._idle_track.stop()
        await self.pc.close()
        await aiortc_compat.wait_pc_closed(self.pc, self._settings.peer_close_timeout_s)
        if self._mux_session is not None:
            self._mux.unregister(self._mux_session)
        self.closed_at = time.time()
        self._feed(Event.TEARDOWN_DONE)
        info.state = ST.SESSION_STATE_CLOSED
        info.stats.close_reason = reason  # type: ignore[assignment]
        info.stats.closed_at.CopyFrom(timestamp(self.closed_at))
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
            **(self._rtp.drops() if self._rtp is not None else {}),
            **self._caller_audio.outcomes(),
        )
        self._closed.set()
        self._on_closed(self)

    async def _tell_caller(self, reason: int) -> None:
        """A session the server ends says why (realtime_events.ENDINGS) on the data channel
        and sidebands, and waits (bounded) for the caller's SCTP acknowledgement, so the
        DTLS close alert that follows never overtakes it."""
        ending = self._events.ending(reason)
        if ending is None:
            return
        self._server_events.send(ending)
        delivered = await aiortc_compat.wait_data_channel_delivered(
            self.pc, self._settings.close_notice_timeout_s
        )
        if not delivered:
            log_event(logger, "session.close_notice_unacknowledged", session__id=self.id)

    # ---- stats

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
        stats.created_at.CopyFrom(timestamp(self.created_at))
        transceivers = self.pc.getTransceivers()
        if transceivers:
            stats.dtls_state = transceivers[0].receiver.transport.state
        stats.min_rtt_ms = self.first_hop_rtt_ms()
        if self._connection is not None:
            pair = aiortc_compat.selected_pair(self._connection)
            if pair is not None:
                stats.selected_local_address.ip, stats.selected_local_address.port = pair.local
                stats.selected_remote_address.ip, stats.selected_remote_address.port = pair.remote
        if self._rtp is not None:
            self._rtp.fill_stats(stats)
        if self._caller_audio.adaptive:
            stats.jitter_buffer_delay_ms = self._caller_audio.jitter.mean_delay_ms
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


def endpoints_of(
    addresses: Sequence[common_pb2.SocketAddress], *, tcp: bool = False
) -> tuple[tuple[str, int], ...]:
    """The UDP relay endpoints (at least one), or with `tcp` the ICE-TCP ones (any number)."""
    out: list[tuple[str, int]] = []
    for address in addresses:
        if not address.ip or not 1 <= address.port <= 65535:
            raise sdp.SdpError(f"relay_endpoints: bad address {address.ip!r}:{address.port}")
        if address.tcp == tcp:
            out.append((address.ip, int(address.port)))
    if not out and not tcp:
        raise sdp.SdpError("relay_endpoints: at least one UDP endpoint is required")
    return tuple(out)
