"""Settings of the bridge service (flags, TOML file, VOICEEDGE_BRIDGE_* environment)."""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings, SettingsError, host_port, setting

BACKENDS = ("echo", "realtime")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BridgeSettings(ServiceSettings):
    """Settings of the bridge service."""

    # Overriding the field replaces ServiceSettings' rule for it too: so it states it again.
    grpc_listen: str = setting(
        "127.0.0.1:50055", "host:port of the gRPC server (port 0: any free)", parse=host_port
    )
    backend: str = dataclasses.field(
        default="echo",
        metadata={"help": "echo (turn-taking echo agent) or realtime (OpenAI Realtime WebSocket)"},
    )
    max_sessions: int = dataclasses.field(
        default=1000, metadata={"help": "concurrent streams; more get RESOURCE_EXHAUSTED"}
    )
    sample_rate_hz: int = dataclasses.field(
        default=24000,
        metadata={"help": "rate of the response audio, and of caller audio when unset"},
    )
    vad_aggressiveness: int = dataclasses.field(
        default=2, metadata={"help": "webrtcvad mode 0 (lenient) to 3 (strict)"}
    )
    speech_start_ms: int = dataclasses.field(
        default=60, metadata={"help": "continuous speech needed before a turn starts"}
    )
    end_of_turn_silence_ms: int = dataclasses.field(
        default=700,
        metadata={
            "help": "silence that ends a turn (per session: turn_detection.silence_duration_ms)"
        },
    )
    short_utterance_ms: int = dataclasses.field(
        default=1000,
        metadata={"help": "utterances shorter than this get short_utterance_extra_silence_ms more"},
    )
    short_utterance_extra_silence_ms: int = dataclasses.field(
        default=300,
        metadata={"help": "extra end-of-turn silence after a short utterance (0: off)"},
    )
    prefix_padding_ms: int = dataclasses.field(
        default=300, metadata={"help": "audio kept before the detected speech start"}
    )
    max_utterance_s: float = dataclasses.field(
        default=30.0, metadata={"help": "longest utterance the echo agent keeps (oldest dropped)"}
    )
    playout_lead_ms: int = dataclasses.field(
        default=200,
        metadata={"help": "how far response audio may run ahead of real time (jitter buffer)"},
    )
    realtime_url: str = dataclasses.field(
        default="",
        metadata={"help": "ws(s):// URL of the OpenAI-Realtime-compatible endpoint (realtime)"},
    )
    realtime_api_key: str = dataclasses.field(
        default="", metadata={"help": "Bearer token for realtime_url; empty: no Authorization"}
    )
    realtime_connect_timeout_s: float = dataclasses.field(
        default=10.0, metadata={"help": "limit on opening the realtime WebSocket"}
    )

    def validate(self) -> None:
        super().validate()
        if self.backend not in BACKENDS:
            raise SettingsError(
                f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.max_sessions < 1:
            raise SettingsError("max_sessions: must be >= 1")
        if not 8000 <= self.sample_rate_hz <= 48000:
            raise SettingsError("sample_rate_hz: must be 8000 to 48000")
        if not 0 <= self.vad_aggressiveness <= 3:
            raise SettingsError("vad_aggressiveness: must be 0 to 3")
        if not 0 < self.speech_start_ms <= 2000:
            raise SettingsError("speech_start_ms: must be 1 to 2000")
        if not 0 < self.end_of_turn_silence_ms <= 10000:
            raise SettingsError("end_of_turn_silence_ms: must be 1 to 10000")
        if self.short_utterance_ms < 0:
            raise SettingsError("short_utterance_ms: must be >= 0")
        if not 0 <= self.short_utterance_extra_silence_ms <= 10000:
            raise SettingsError("short_utterance_extra_silence_ms: must be 0 to 10000")
        if not 0 <= self.prefix_padding_ms <= 2000:
            raise SettingsError("prefix_padding_ms: must be 0 to 2000")
        if not 0 < self.max_utterance_s <= 600:
            raise SettingsError("max_utterance_s: must be > 0 and <= 600")
        if not 0 <= self.playout_lead_ms <= 5000:
            raise SettingsError("playout_lead_ms: must be 0 to 5000")
        if self.realtime_connect_timeout_s <= 0:
            raise SettingsError("realtime_connect_timeout_s: must be > 0")
        if self.backend == "realtime" and not self.realtime_url:
            raise SettingsError("realtime_url: required when backend is realtime")
        if self.realtime_url and not self.realtime_url.startswith(("ws://", "wss://")):
            raise SettingsError(
                f"realtime_url: expected ws:// or wss://, got {self.realtime_url!r}"
            )
