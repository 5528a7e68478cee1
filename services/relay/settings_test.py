"""RelaySettings: defaults work on loopback, bad values name their field."""

from __future__ import annotations

import pytest

from libs.config.settings import SettingsError, load_settings
from services.relay.settings import RelaySettings


def _load(*argv: str, environ: dict[str, str] | None = None) -> RelaySettings:
    return load_settings(
        RelaySettings,
        list(argv),
        env_prefix="VOICEEDGE_RELAY_",
        prog="relay",
        description="",
        environ=environ or {},
    )


def test_defaults() -> None:
    settings = _load()
    assert settings.udp_listen == ("127.0.0.1:3478",)
    assert settings.internal_listen == "127.0.0.1:0"
    assert settings.workers == 0
    assert settings.redis_url == ""
    assert settings.geosteer_address == ""
    assert settings.idle_timeout_s == settings.binding_ttl_s == 30.0
    assert settings.max_bindings == 1_000_000
    assert settings.verify_message_integrity


def test_lists_from_flags_and_environment() -> None:
    settings = _load(
        "--udp-listen",
        "127.0.0.1:3478,[::1]:3478",
        environ={"VOICEEDGE_RELAY_TRANSCEIVERS": "1/1=127.0.0.1:40000,2/5=127.0.0.1:40001"},
    )
    assert settings.udp_listen == ("127.0.0.1:3478", "[::1]:3478")
    assert settings.transceivers == ("1/1=127.0.0.1:40000", "2/5=127.0.0.1:40001")


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--udp-listen", "nowhere", "udp_listen"),
        ("--internal-listen", "x", "internal_listen"),
        ("--workers", "-1", "workers"),
        ("--ufrag-keys", "1:abcd", "ufrag_keys"),
        ("--cluster-id", "70000", "cluster_id"),
        ("--transceivers", "1/1", "transceivers"),
        ("--geosteer-address", "geosteer", "geosteer_address"),
        ("--redis-url", "localhost:6379", "redis_url"),
        ("--idle-timeout-s", "0", "idle_timeout_s"),
        ("--binding-ttl-s", "-1", "binding_ttl_s"),
        ("--max-bindings", "0", "max_bindings"),
        ("--redis-max-inflight", "0", "redis_max_inflight"),
        ("--public-advertise", "vip.example:3478", "public_advertise"),
        ("--public-advertise", "203.0.113.1:0", "public_advertise"),
        ("--public-advertise", "203.0.113.1:3478", "public_advertise: registering needs"),
        ("--tcp-listen", "nowhere", "tcp_listen"),
        ("--tcp-advertise", "203.0.113.1:443", "tcp_advertise: registering needs"),
        ("--tcp-max-frame-bytes", "70000", "tcp_max_frame_bytes"),
        ("--tcp-first-frame-timeout-s", "0", "tcp_first_frame_timeout_s"),
        ("--tcp-max-pending-per-ip", "0", "tcp_max_pending_per_ip"),
    ],
)
def test_bad_values_name_the_field(flag: str, value: str, field: str) -> None:
    with pytest.raises(SettingsError, match=field):
        _load(flag, value)
