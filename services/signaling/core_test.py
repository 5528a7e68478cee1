"""Pure parts: token buckets, client IP behind proxies, settings validation."""

from __future__ import annotations

import dataclasses

import pytest

from libs.config.settings import SettingsError
from services.signaling.clientip import client_ip, parse_networks
from services.signaling.ratelimit import RateLimiter, retry_after_header
from services.signaling.settings import SignalingSettings


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.take("k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k", 0.0) == pytest.approx(0.5)
    assert limiter.take("k", 0.5) == 0.0  # one token back after 1/rate
    assert limiter.take("other", 0.5) == 0.0  # buckets are independent
    assert retry_after_header(0.2) == 1
    assert retry_after_header(2.1) == 3


def test_bucket_memory_is_bounded() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_buckets=10)
    for i in range(100):
        limiter.take(f"ip{i}", 0.0)
    assert len(limiter) == 10


TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])
CLIENT_IPS = [
    ("direct peer", "203.0.113.9", [], "203.0.113.9"),
    ("untrusted peer ignores header", "203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
    ("trusted peer uses header", "10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
    ("right-most untrusted hop", "10.1.2.3", ["1.1.1.1, 198.51.100.1, 10.9.9.9"], "198.51.100.1"),
    ("spoofed left hops ignored", "10.1.2.3", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
    ("only trusted hops", "10.1.2.3", ["10.4.4.4"], "10.4.4.4"),
    ("garbage hop stops", "10.1.2.3", ["198.51.100.1, nonsense"], "10.1.2.3"),
    ("ipv6", "fd00::1", ["2001:db8::7"], "2001:db8::7"),
    ("no peer", None, [], ""),
    ("trusted peer no header", "10.1.2.3", [], "10.1.2.3"),
]


@pytest.mark.parametrize(
    ("name", "peer", "header", "expected"), CLIENT_IPS, ids=[c[0] for c in CLIENT_IPS]
)
def test_client_ip(name: str, peer: str | None, header: list[str], expected: str) -> None:
    assert name
    assert client_ip(peer, header, TRUSTED) == expected


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"http_listen": "nowhere"}, "http_listen"),
        ({"ufrag_keys": "1:abcd"}, "ufrag_keys"),
        ({"ufrag_current_key_id": 9}, "ufrag_keys"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"client_secret_ttl_s": 5}, "client_secret_ttl_s"),
        ({"trusted_proxies": ("not-a-cidr",)}, "trusted_proxies"),
        ({"api_keys": ("ek_short",)}, "api_keys"),
        ({"redis_url": "http://x"}, "redis_url"),
        ({"rate_per_ip_per_s": 0.0}, "rate_per_ip_per_s"),
    ],
)
def test_bad_settings_name_the_field(change: dict[str, object], field: str) -> None:
    settings = dataclasses.replace(SignalingSettings(), **change)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=field):
        settings.validate()


def test_defaults_are_valid_and_rotation_picks_the_highest_key() -> None:
    SignalingSettings().validate()
    rotated = SignalingSettings(ufrag_keys="1:" + "11" * 16 + ",2:" + "22" * 16)
    assert rotated.keyring().current_id == 2
    pinned = dataclasses.replace(rotated, ufrag_current_key_id=1)
    assert pinned.keyring().current_id == 1
