"""Settings of the transceiver service (flags, TOML file, VOICEEDGE_TRANSCEIVER_* environment)."""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings, SettingsError, parse_host_port
from services.transceiver import opus


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransceiverSettings(ServiceSettings):
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
        if self.closed_sessions_retained < 0:
            raise SettingsError("closed_sessions_retained: must be >= 0")
        for name in ("cluster_id", "transceiver_id"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise SettingsError(f"{name}: 0 to 65535")
