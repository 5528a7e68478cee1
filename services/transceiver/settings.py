"""Settings of the transceiver service (flags, TOML file, VOICEEDGE_TRANSCEIVER_* environment).

`TransceiverSettings` is made of groups, each a frozen dataclass of its own handed whole to
what needs it: `BridgeSettings` (the bridge stream), `MediaSettings` (audio both ways) and
`EngineSettings` (the WebRTC engine's knobs: pion's SettingEngine idea; in aiortc/aioice
these are module constants tests patch). The loader sees their fields as flat settings.
"""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings, SettingsError, parse_host_port
from services.transceiver import opus


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Knobs of the WebRTC engine under every session: consent freshness, RTCP, loss
    concealment, buffers and timeouts of set-up and teardown."""

    consent_interval_s: float = dataclasses.field(
        default=5.0,
        metadata={"help": "ICE consent check interval, randomised 0.8-1.2x (RFC 7675 §5.1)"},
    )
    consent_expiry_s: float = dataclasses.field(
        default=30.0,
        metadata={"help": "consent ends this long after the last answered check (RFC 7675)"},
    )
    consent_retransmissions: int = dataclasses.field(
        default=3,
        metadata={
            "help": "STUN retransmissions per consent check (RTO 0.5 s doubling: 3 keep a "
            "check open 7.5 s)"
        },
    )
    receiver_report_interval_frames: int = dataclasses.field(
        default=50,
        metadata={"help": "20 ms ticks between our RTCP receiver reports to the caller"},
    )
    concealment_max_frames: int = dataclasses.field(
        default=5,
        metadata={
            "help": "lost caller frames filled with libopus concealment for PCM bridges; "
            "the rest of a gap stays a gap"
        },
    )
    pending_events_max: int = dataclasses.field(
        default=256,
        metadata={
            "help": "server events held until the data channel opens, and client events "
            "until the bridge accepted"
        },
    )
    peer_close_timeout_s: float = dataclasses.field(
        default=5.0,
        metadata={"help": "wait for aiortc's own tasks of a closing peer connection"},
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BridgeSettings:
    """Where sessions' bridge streams go and how they open."""

    bridge_address: str = dataclasses.field(
        default="127.0.0.1:50055",
        metadata={"help": "default inference bridge gRPC target host:port"},
    )
    bridge_batching: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "all sessions to a bridge on one batched StreamSessions stream; falls back "
            "to a StreamSession per session where the bridge answers UNIMPLEMENTED"
        },
    )
    bridge_open_timeout_s: float = dataclasses.field(
        default=5.0,
        metadata={"help": "time for the bridge to answer SessionStart with SessionAccepted"},
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MediaSettings:
    """Audio both ways: Opus encoding, PCM towards the bridge, the playout buffer."""

    opus_application: str = dataclasses.field(
        default="audio",
        metadata={
            "help": "libopus application for audio we encode: audio (default, ~4x cheaper "
            "at complexity 5), voip (SILK speech path) or lowdelay (CELT only)"
        },
    )
    opus_complexity: int = dataclasses.field(
        default=5, metadata={"help": "libopus encoder complexity 0-10 (10: libopus default)"}
    )
    sample_rate_hz: int = dataclasses.field(
        default=24000, metadata={"help": "PCM rate of caller audio sent to the bridge (mono s16le)"}
    )
    jitter_buffer_frames: int = dataclasses.field(
        default=3,
        metadata={"help": "20 ms bridge frames buffered before playout starts after a gap"},
    )
    playout_queue_max_frames: int = dataclasses.field(
        default=1500,
        metadata={"help": "bound of queued response audio (20 ms frames); the oldest drop"},
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionSettings(EngineSettings, MediaSettings, BridgeSettings):
    """The groups every session runs with, handed to it whole."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransceiverSettings(SessionSettings, ServiceSettings):
    """Settings of the transceiver service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50052",
        metadata={"help": "host:port of the gRPC server (port 0: any free)"},
    )
    media_listen: str = dataclasses.field(
        default="127.0.0.1:40000",
        metadata={"help": "host:port of the one internal UDP port relays forward to (0: any)"},
    )
    max_sessions: int = dataclasses.field(
        default=200, metadata={"help": "open sessions beyond which CreateSession is refused"}
    )
    ice_timeout_ms: int = dataclasses.field(
        default=10000,
        metadata={"help": "default time from CreateSession to ICE connected before giving up"},
    )
    closed_sessions_retained: int = dataclasses.field(
        default=1000, metadata={"help": "closed sessions kept for GetSession/ListSessions"}
    )
    geosteer_address: str = dataclasses.field(
        default="", metadata={"help": "geosteer gRPC target for RegisterNode/Heartbeat; empty: off"}
    )
    node_id: str = dataclasses.field(
        default="", metadata={"help": "node id registered with geosteer; empty: transceiver-<id>"}
    )
    cluster_id: int = dataclasses.field(
        default=1, metadata={"help": "cluster id, as encoded in the ICE ufrag"}
    )
    transceiver_id: int = dataclasses.field(
        default=1, metadata={"help": "transceiver id within the cluster, as in the ICE ufrag"}
    )
    grpc_advertise: str = dataclasses.field(
        default="",
        metadata={
            "help": "host:port geosteer/signaling reach the gRPC server at; empty: grpc_listen"
        },
    )
    media_advertise: str = dataclasses.field(
        default="",
        metadata={"help": "host:port relays reach media_listen at; empty: the bound address"},
    )

    def validate(self) -> None:
        super().validate()
        parse_host_port(self.media_listen, "media_listen")
        parse_host_port(self.bridge_address, "bridge_address")
        if self.geosteer_address:
            parse_host_port(self.geosteer_address, "geosteer_address")
        if self.grpc_advertise:
            parse_host_port(self.grpc_advertise, "grpc_advertise")
        if self.media_advertise:
            parse_host_port(self.media_advertise, "media_advertise")
        if self.max_sessions < 0:
            raise SettingsError("max_sessions: must be >= 0")
        if self.ice_timeout_ms <= 0:
            raise SettingsError("ice_timeout_ms: must be > 0")
        if self.opus_application not in opus.APPLICATIONS:
            raise SettingsError(f"opus_application: one of {', '.join(opus.APPLICATIONS)}")
        if not 0 <= self.opus_complexity <= 10:
            raise SettingsError("opus_complexity: 0 to 10")
        if self.sample_rate_hz not in (8000, 16000, 24000, 48000):
            raise SettingsError("sample_rate_hz: one of 8000, 16000, 24000, 48000")
        if not 0 <= self.jitter_buffer_frames <= 50:
            raise SettingsError("jitter_buffer_frames: 0 to 50")
        if self.playout_queue_max_frames < max(1, self.jitter_buffer_frames):
            raise SettingsError("playout_queue_max_frames: must be >= jitter_buffer_frames")
        if self.bridge_open_timeout_s <= 0:
            raise SettingsError("bridge_open_timeout_s: must be > 0")
        for name in ("consent_interval_s", "consent_expiry_s", "peer_close_timeout_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be > 0")
        if not 0 <= self.consent_retransmissions <= 10:
            raise SettingsError("consent_retransmissions: 0 to 10")
        if self.receiver_report_interval_frames <= 0:
            raise SettingsError("receiver_report_interval_frames: must be > 0")
        if self.concealment_max_frames < 0:
            raise SettingsError("concealment_max_frames: must be >= 0")
        if self.pending_events_max < 0:
            raise SettingsError("pending_events_max: must be >= 0")
        if self.closed_sessions_retained < 0:
            raise SettingsError("closed_sessions_retained: must be >= 0")
        for name in ("cluster_id", "transceiver_id"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise SettingsError(f"{name}: 0 to 65535")
