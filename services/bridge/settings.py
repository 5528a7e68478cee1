"""Settings of the bridge service (flags, TOML file, VOICEEDGE_BRIDGE_* environment)."""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings, SettingsError, host_port, setting

BACKENDS = ("echo", "realtime", "pipecat", "listen")


def _websocket_url(url: str) -> str:
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"expected ws:// or wss://, got {url!r}")
    return url


def _module_function(spec: str) -> str:
    module, _, function = spec.partition(":")
    if not (
        module and function.isidentifier() and all(p.isidentifier() for p in module.split("."))
    ):
        raise ValueError(f"expected module:function, got {spec!r}")
    return spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class BridgeSettings(ServiceSettings):
    """Settings of the bridge service."""

    grpc_listen: str = setting(
        "127.0.0.1:50055", "host:port of the gRPC server (port 0: any free)", parse=host_port
    )
    backend: str = setting(
        "echo",
        "echo (turn-taking echo agent), realtime (OpenAI Realtime WebSocket), pipecat "
        "(a Pipecat pipeline per session, from pipecat_factory) or listen (offline speech "
        "recognition answering what it understood)",
        choices=BACKENDS,
    )
    max_sessions: int = setting(1000, "concurrent streams; more get RESOURCE_EXHAUSTED", ge=1)
    sample_rate_hz: int = setting(
        24000, "rate of the response audio, and of caller audio when unset", ge=8000, le=48000
    )
    vad_aggressiveness: int = setting(2, "webrtcvad mode 0 (lenient) to 3 (strict)", ge=0, le=3)
    vad_energy_floor_dbfs: float = setting(
        -50.0,
        "frames quieter (RMS) than this are silence whatever webrtcvad says (it hangs over "
        "~100 ms), and speech ends at the last sample above it; -120: off",
        ge=-120,
        le=0,
    )
    speech_start_ms: int = setting(
        60, "continuous speech needed before a turn starts", ge=1, le=2000
    )
    end_of_turn_silence_ms: int = setting(
        700,
        "silence that ends a turn (per session: turn_detection.silence_duration_ms)",
        ge=1,
        le=10000,
    )
    short_utterance_ms: int = setting(
        1000, "utterances shorter than this get short_utterance_extra_silence_ms more", ge=0
    )
    short_utterance_extra_silence_ms: int = setting(
        300, "extra end-of-turn silence after a short utterance (0: off)", ge=0, le=10000
    )
    prefix_padding_ms: int = setting(
        300, "audio kept before the detected speech start", ge=0, le=2000
    )
    max_utterance_s: float = setting(
        30.0, "longest utterance the echo agent keeps (oldest dropped)", gt=0, le=600
    )
    playout_lead_ms: int = setting(
        200, "how far response audio may run ahead of real time (jitter buffer)", ge=0, le=5000
    )
    echo_think_ms: int = setting(
        0,
        "echo: wait this long between ResponseStarted and the answer's audio (a model's "
        "think time, for latency tests)",
        ge=0,
        le=10000,
    )
    realtime_url: str = setting(
        "",
        "ws(s):// URL of the OpenAI-Realtime-compatible endpoint (realtime)",
        parse=_websocket_url,
        optional=True,
    )
    realtime_api_key: str = setting("", "Bearer token for realtime_url; empty: no Authorization")
    realtime_connect_timeout_s: float = setting(
        10.0, "limit on opening the realtime WebSocket", gt=0
    )
    realtime_goaway_event: str = setting(
        "session.go_away",
        "type of the server event that announces the upstream closing, with its time left "
        "(time_left_ms, or timeLeft as a duration such as 10s); the adapter pre-connects",
    )
    realtime_expiry_lead_s: float = setting(
        60.0,
        "pre-connect this long before the session's announced expires_at (session.created; "
        "0: off; a sooner one is ignored)",
        ge=0,
    )
    realtime_goaway_margin_ms: int = setting(
        500,
        "after a go-away, swap sockets at the latest this long before the announced close",
        ge=0,
        le=60000,
    )
    realtime_reconnect_attempts: int = setting(
        5,
        "connection attempts after an upstream drop before the call ends (backoff between)",
        ge=1,
        le=100,
    )
    realtime_reconnect_backoff_ms: int = setting(
        100, "pause after the first failed reconnect attempt, doubling to 2 s", ge=0, le=10000
    )
    realtime_reconnect_buffer_ms: int = setting(
        2000,
        "caller audio kept to resend after a reconnect (speech the old socket left unanswered)",
        ge=0,
        le=30000,
    )
    realtime_replay_max_items: int = setting(
        100, "conversation items replayed into a new upstream socket (the newest)", ge=0
    )
    realtime_max_errors_per_min: int = setting(
        10, "non-fatal upstream errors in a minute past which the call ends", ge=1
    )

    pipecat_factory: str = setting(
        "",
        "module:function building each session's Pipecat pipeline (pipecat)",
        parse=_module_function,
        optional=True,
    )
    pipecat_input_rate_hz: int = setting(
        16000, "rate of the caller audio the Pipecat pipeline gets (pipecat)", ge=8000, le=48000
    )

    listen_voice: str = setting(
        "en-us+f3", "espeak-ng voice of the listen backend's answers (espeak-ng --voices)"
    )
    listen_words_per_minute: int = setting(
        140, "speaking rate of the listen backend's answers", ge=80, le=450
    )
    listen_workers: int = setting(
        1,
        "speech recognition processes of the listen backend (each loads the model: ~100 MB)",
        ge=1,
        le=32,
    )

    def validate(self) -> None:
        super().validate()
        if self.backend == "realtime" and not self.realtime_url:
            raise SettingsError("realtime_url: required when backend is realtime")
        if self.backend == "pipecat" and not self.pipecat_factory:
            raise SettingsError("pipecat_factory: required when backend is pipecat")
