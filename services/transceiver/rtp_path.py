"""One session's audio RTP on our own path (rtp.py) once DTLS keyed SRTP: the caller's
packets from the mux straight to the receiver, ours through the mux to the client address
of the selected pair, and our RTCP receiver reports."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection

from services.transceiver import aiortc_compat, rtp, sdp
from services.transceiver.media import OPUS_SAMPLES_PER_FRAME
from services.transceiver.udpmux import MuxSession, UdpMux
from voiceedge.common.v1 import common_pb2


class RtpPath:
    def __init__(
        self,
        mux: UdpMux,
        mux_session: MuxSession,
        connection: Any,
        report_interval_frames: int,
    ) -> None:
        self._mux = mux
        self._mux_session = mux_session
        self._connection = connection
        self.receiver: rtp.RtpReceiver | None = None
        self.sender: rtp.RtpSender | None = None
        self._pc: RTCPeerConnection | None = None
        self._params: sdp.AudioRtpParams | None = None
        self._protect_rtcp: Callable[[bytes], bytes] | None = None
        self._remote: tuple[str, int] | None = None  # the selected pair's client address
        # Receiver reports once a second by default (RFC 3550 §6.2 allows 5 s; WebRTC sends
        # ~1 s), spread over the pacer's ticks.
        self._report_every = report_interval_frames
        self._report_phase = random.randrange(report_interval_frames)

    def follow(self) -> None:
        """The selected pair changed (NAT rebinding): send there from the next packet."""
        self._remote = None

    def start(
        self,
        pc: RTCPeerConnection,
        params: sdp.AudioRtpParams,
        on_opus: Callable[[bytes, int], None],
        on_loss: Callable[[int], None],
        on_packet: rtp.PacketSink | None = None,
    ) -> None:
        """DTLS keyed SRTP: audio RTP leaves aiortc's per-packet path for ours. With
        `on_packet` (the adaptive receive path) every packet goes there in arrival order,
        older ones and RED ones too, instead of `on_opus`/`on_loss`."""
        srtp = aiortc_compat.srtp_sessions(pc)
        self._pc, self._params = pc, params
        if on_packet is not None:
            self.receiver = rtp.RtpReceiver(
                srtp.inbound,
                params.payload_type,
                on_packet,
                reorder=True,
                red_payload_type=params.red_payload_type,
            )
        else:
            self.receiver = rtp.RtpReceiver(
                srtp.inbound, params.payload_type, on_opus, on_loss=on_loss
            )
        self._mux_session.rtp_sink = self.receiver.datagram
        early, self._mux_session.early_rtp = self._mux_session.early_rtp, None
        for datagram in early or ():  # what came before this path started, in order
            self.receiver.datagram(datagram)
        self.sender = rtp.RtpSender(
            params, srtp.outbound, self._send, aiortc_compat.sender_report_sink(pc)
        )
        self._protect_rtcp = srtp.outbound.protect_rtcp

    def stop(self) -> None:
        self._mux_session.rtp_sink = None

    def send(self, packet: bytes, frame_index: int) -> None:
        """One 20 ms tick after start(): our next Opus packet, and a receiver report when
        one is due."""
        sender = self.sender
        if sender is None:
            return
        sender.send(packet, frame_index, OPUS_SAMPLES_PER_FRAME)
        if frame_index % self._report_every == self._report_phase:
            self._remote = None  # re-read the selected pair (aioice may switch it)
            self._send_receiver_report()

    def _send_receiver_report(self) -> None:
        """RTCP RR on the caller's stream: aiortc's receiver no longer sees our RTP, and the
        caller's encoder adapts to the loss it reports (RFC 3550 §6.4.2)."""
        receiver, params, protect, pc = self.receiver, self._params, self._protect_rtcp, self._pc
        if receiver is None or params is None or protect is None or pc is None:
            return
        source = receiver.source_ssrc
        if source is None:
            return
        lsr, dlsr = aiortc_compat.last_sender_report(pc, source)
        report = receiver.receiver_report(params.ssrc, lsr, dlsr)
        if report is not None:
            self._send(protect(report))

    def _send(self, data: bytes) -> None:
        remote = self._remote
        if remote is None:
            # The selected pair, looked up again once a second (send) rather than per packet.
            remote = self._remote = aiortc_compat.nominated_remote(self._connection)
        if remote is not None:
            self._mux.send(self._mux_session, remote, data)

    def drops(self) -> dict[str, int]:
        """Caller RTP our path did not use, by reason (for the close log)."""
        if self.receiver is None:
            return {}
        s = self.receiver.stats
        return {
            "rtp__dropped_srtp": s.dropped_srtp,
            "rtp__dropped_late": s.dropped_late,
            "rtp__dropped_malformed": s.dropped_malformed,
            "rtp__dropped_payload_type": s.dropped_payload_type,
        }

    def fill_stats(self, stats: common_pb2.SessionStats) -> None:
        counters = self._mux_session.counters
        stats.bytes_received = counters.bytes_in
        stats.bytes_sent = counters.bytes_out
        if self.receiver is not None:
            received = self.receiver.stats
            stats.packets_received = received.packets
            stats.packets_lost = self.receiver.lost
            stats.jitter_ms = received.jitter_ms
        if self.sender is not None:
            stats.packets_sent = self.sender.packets
