"""Settings of the transceiver service (flags, TOML file, VOICEEDGE_TRANSCEIVER_* environment).

`TransceiverSettings` is made of groups, each a frozen dataclass of its own handed whole to
what needs it: `BridgeSettings` (the bridge stream), `MediaSettings` (audio both ways),
`ReceiveSettings` (caller audio to the bridge) and `EngineSettings` (the WebRTC engine's
knobs: pion's SettingEngine idea; in aiortc/aioice these are module constants tests patch).
The loader sees their fields as flat settings.
"""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings, SettingsError, host_port, setting
from services.geosteer.target import geosteer_target
from services.transceiver import opus


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Knobs of the WebRTC engine under every session: consent freshness, RTCP, loss
    concealment, buffers and timeouts of set-up and teardown."""

    consent_interval_s: float = setting(
        5.0, "ICE consent check interval, randomised 0.8-1.2x (RFC 7675 §5.1)", gt=0
    )
    consent_expiry_s: float = setting(
        30.0, "consent ends this long after the last answered check (RFC 7675)", gt=0
    )
    consent_retransmissions: int = setting(
        3,
        "STUN retransmissions per consent check (RTO 0.5 s doubling: 3 keep a check open 7.5 s)",
        ge=0,
        le=10,
    )
    receiver_report_interval_frames: int = setting(
        50, "20 ms ticks between our RTCP receiver reports to the caller", ge=1
    )
    concealment_max_frames: int = setting(
        5,
        "lost caller frames filled with libopus concealment for PCM bridges; the rest of a "
        "gap stays a gap",
        ge=0,
    )
    pending_events_max: int = setting(
        256,
        "server events held until the data channel opens, and client events until the "
        "bridge accepted",
        ge=0,
    )
    peer_close_timeout_s: float = setting(
        5.0, "wait for aiortc's own tasks of a closing peer connection", gt=0
    )
    close_notice_timeout_s: float = setting(
        1.0,
        "wait for the caller to acknowledge (SCTP) the last event of a session the server "
        "ends, before the DTLS close alert",
        gt=0,
    )
    reconnect_grace_s: float = setting(
        30.0,
        "a session whose client went silent (consent expired) is kept this long for an ICE "
        "restart to pick it up, then closed with client_gone; 0: closed at once (consent_lost)",
        ge=0,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BridgeSettings:
    """Where sessions' bridge streams go and how they open."""

    bridge_address: str = setting(
        "127.0.0.1:50055", "default inference bridge gRPC target host:port", parse=host_port
    )
    bridge_batching: bool = setting(
        True,
        "all sessions to a bridge on one batched StreamSessions stream; falls back to a "
        "StreamSession per session where the bridge answers UNIMPLEMENTED",
    )
    bridge_open_timeout_s: float = setting(
        5.0, "time for the bridge to answer SessionStart with SessionAccepted", gt=0
    )
    bridge_connect_timeout_s: float = setting(
        1.0,
        "CreateSession waits this long for an unconnected bridge channel to connect; one "
        "that fails is refused with UNAVAILABLE (signaling: 503 and Retry-After)",
        gt=0,
    )
    bridge_reconnect_grace_s: float = setting(
        10.0,
        "a session whose bridge stream broke reopens it (a new SessionStart) for this long "
        "before it ends with CLOSE_REASON_BRIDGE_ERROR; 0: end at once",
        ge=0,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MediaSettings:
    """Audio both ways: Opus encoding, PCM towards the bridge, the playout buffer."""

    opus_application: str = setting(
        "audio",
        "libopus application for audio we encode: audio (default, ~4x cheaper at complexity "
        "5), voip (SILK speech path) or lowdelay (CELT only)",
        choices=opus.APPLICATIONS,
    )
    opus_complexity: int = setting(
        5, "libopus encoder complexity (10: libopus default)", ge=0, le=10
    )
    sample_rate_hz: int = setting(
        24000,
        "PCM rate of caller audio sent to the bridge (mono s16le)",
        choices=(8000, 16000, 24000, 48000),
    )
    jitter_buffer_frames: int = setting(
        3, "20 ms bridge frames buffered before playout starts after a gap", ge=0, le=50
    )
    playout_queue_max_s: float = setting(
        30.0,
        "bound of queued response audio: a burst up to it plays whole at 20 ms a frame, "
        "beyond it the newest frames drop, counted (at least jitter_buffer_frames x 20 ms)",
        gt=0,
        le=600,
    )
    playout_drain_timeout_s: float = setting(
        30.0,
        "a bridge SessionEnd with after_playout waits this long at most for the queued "
        "response audio to play out before the call ends",
        ge=0,
    )

    @property
    def playout_queue_max_frames(self) -> int:
        return max(1, round(self.playout_queue_max_s * 1000 / 20))


RECEIVE_PATHS = ("adaptive", "direct")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReceiveSettings:
    """Caller audio on its way to the bridge: the jitter buffer and the first words."""

    receive_path: str = setting(
        "direct",
        "caller audio to the bridge: adaptive (experimental: a jitter buffer reorders and "
        "paces 50 frames a second, FEC/RED/PLC for lost frames, the first words kept until "
        "the bridge accepts) or direct (arrival order, late packets dropped, PLC for gaps, nothing "
        "before the bridge accepts)",
        choices=RECEIVE_PATHS,
    )
    jitter_min_delay_ms: float = setting(
        20.0, "the adaptive jitter buffer's smallest delay (at zero jitter)", ge=0, le=200
    )
    jitter_max_delay_ms: float = setting(
        200.0, "the adaptive jitter buffer's largest delay, whatever the jitter", ge=20, le=1000
    )
    first_words_max_s: float = setting(
        6.0,
        "adaptive path: caller audio kept from the first packet until the bridge accepts "
        "(beyond it the oldest drop, counted)",
        ge=0,
        le=60,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionSettings(EngineSettings, MediaSettings, ReceiveSettings, BridgeSettings):
    """The groups every session runs with, handed to it whole."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransceiverSettings(SessionSettings, ServiceSettings):
    """Settings of the transceiver service."""

    grpc_listen: str = setting(
        "127.0.0.1:50052", "host:port of the gRPC server (port 0: any free)", parse=host_port
    )
    media_listen: str = setting(
        "127.0.0.1:40000",
        "host:port of the one internal UDP port relays forward to (0: any)",
        parse=host_port,
    )
    max_sessions: int = setting(200, "open sessions beyond which CreateSession is refused", ge=0)
    admission_max_loop_lag_ms: float = setting(
        50.0,
        "CreateSession is refused (RESOURCE_EXHAUSTED overloaded) while the event loop's "
        "median lateness over the last 2 s exceeds this; 0: off",
        ge=0,
    )
    admission_max_cpu_percent: float = setting(
        90.0,
        "CreateSession is refused (RESOURCE_EXHAUSTED overloaded) while the process's median "
        "CPU over the last 2 s exceeds this share of one core (all threads); 0: off",
        ge=0,
    )
    mux_control_first: bool = setting(
        False,
        "the media socket's reader hands STUN/DTLS on ahead of RTP/RTCP of the same read "
        "(consent and set-ups first when the loop is behind); off: arrival order",
    )
    ice_timeout_ms: int = setting(
        10000, "default time from CreateSession to ICE connected before giving up", ge=1
    )
    closed_sessions_retained: int = setting(
        1000, "closed sessions kept for GetSession/ListSessions", ge=0
    )
    geosteer_address: str = setting(
        "",
        "geosteer for RegisterNode/Heartbeat: host:port, a DNS name with every replica's "
        "address, or comma-separated IP:port of each replica; empty: off",
        parse=geosteer_target,
        optional=True,
    )
    node_id: str = setting("", "node id registered with geosteer; empty: transceiver-<id>")
    cluster_id: int = setting(1, "cluster id, as encoded in the ICE ufrag", ge=0, le=0xFFFF)
    transceiver_id: int = setting(
        1, "transceiver id within the cluster, as in the ICE ufrag", ge=0, le=0xFFFF
    )
    grpc_advertise: str = setting(
        "",
        "host:port geosteer/signaling reach the gRPC server at; empty: grpc_listen",
        parse=host_port,
        optional=True,
    )
    media_advertise: str = setting(
        "",
        "host:port relays reach media_listen at; empty: the bound address",
        parse=host_port,
        optional=True,
    )
    rtt_report_interval_s: float = setting(
        10.0,
        "how often live sessions' first-hop RTTs are sampled for geosteer (each batch rides "
        "the next heartbeat)",
        gt=0,
    )
    rtt_report_window: int = setting(
        8,
        "a session's first-hop RTT for geosteer is the smallest of the caller's last this "
        "many RTCP round trips (loop lag and queueing only add to one)",
        ge=1,
        le=1000,
    )
    rtt_report_min_samples: int = setting(
        3,
        "RTCP round trips a session needs before its RTT is reported to geosteer",
        ge=1,
        le=1000,
    )

    def validate(self) -> None:
        super().validate()
        if self.rtt_report_min_samples > self.rtt_report_window:
            raise SettingsError("rtt_report_min_samples: at most rtt_report_window")
        if self.playout_queue_max_frames < self.jitter_buffer_frames:
            raise SettingsError("playout_queue_max_s: must hold jitter_buffer_frames")
