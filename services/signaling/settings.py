"""Settings of the signaling service (flags, TOML file, VOICEEDGE_SIGNALING_* environment).

The API key is the exception: `VOICEEDGE_API_KEY` (no service prefix) is read by the entry
point in addition to `api_keys`, so one variable serves every tool and client.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from libs.config.settings import ServiceSettings, SettingsError, parse_host_port
from libs.wire.ufrag import DEV_KEYRING_SPEC, Keyring


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignalingSettings(ServiceSettings):
    """Settings of the signaling service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50053",
        metadata={"help": "host:port of the gRPC server (port 0: any free)"},
    )
    http_listen: str = dataclasses.field(
        default="127.0.0.1:8080",
        metadata={"help": "host:port of the public HTTP API (port 0: any free)"},
    )
    api_keys: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": "accepted API keys, comma separated (VOICEEDGE_API_KEY adds one; none at "
            "all: a dev key is generated and printed)"
        },
    )
    geosteer_address: str = dataclasses.field(
        default="127.0.0.1:50051", metadata={"help": "gRPC target of geosteer"}
    )
    geosteer_timeout_s: float = dataclasses.field(
        default=2.0, metadata={"help": "deadline of one RouteSession call"}
    )
    create_session_timeout_s: float = dataclasses.field(
        default=5.0, metadata={"help": "deadline of one transceiver CreateSession call"}
    )
    max_transceiver_attempts: int = dataclasses.field(
        default=3, metadata={"help": "ranked transceivers tried per call before giving up"}
    )
    ufrag_keys: str = dataclasses.field(
        default=DEV_KEYRING_SPEC,
        metadata={"help": "ufrag keyring '<id>:<hex>,...' (default: the public dev key)"},
    )
    ufrag_current_key_id: int = dataclasses.field(
        default=0, metadata={"help": "key id used to mint new ufrags; 0: the highest id"}
    )
    max_body_bytes: int = dataclasses.field(
        default=65536, metadata={"help": "largest accepted request body (413 above)"}
    )
    redis_url: str = dataclasses.field(
        default="", metadata={"help": "redis://host:port/db for call state; empty: in memory"}
    )
    call_retention_s: float = dataclasses.field(
        default=86400.0, metadata={"help": "how long a call record is kept after creation"}
    )
    client_secret_ttl_s: int = dataclasses.field(
        default=600, metadata={"help": "default lifetime of an ephemeral key (10-7200)"}
    )
    rate_per_key_per_s: float = dataclasses.field(
        default=20.0, metadata={"help": "sustained requests per second per API/ephemeral key"}
    )
    burst_per_key: int = dataclasses.field(
        default=40, metadata={"help": "request burst allowed per key"}
    )
    rate_per_ip_per_s: float = dataclasses.field(
        default=10.0, metadata={"help": "sustained requests per second per client IP"}
    )
    burst_per_ip: int = dataclasses.field(
        default=20, metadata={"help": "request burst allowed per client IP"}
    )
    trusted_proxies: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"help": "CIDRs whose X-Forwarded-For is believed, comma separated"},
    )
    cors_origins: tuple[str, ...] = dataclasses.field(
        default=("*",), metadata={"help": "origins allowed by CORS ('*': any)"}
    )
    demo_page: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "serve the demo page at / and mint client secrets for it at "
            "POST /demo/client_secret (loopback peers only; a development aid)"
        },
    )
    retry_after_s: int = dataclasses.field(
        default=2, metadata={"help": "Retry-After of 503 answers when no cluster has capacity"}
    )

    def validate(self) -> None:
        super().validate()
        parse_host_port(self.http_listen, "http_listen")
        parse_host_port(self.geosteer_address, "geosteer_address")
        for name in ("geosteer_timeout_s", "create_session_timeout_s", "call_retention_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be > 0")
        for name in ("rate_per_key_per_s", "rate_per_ip_per_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be > 0")
        for name in ("burst_per_key", "burst_per_ip", "max_transceiver_attempts", "retry_after_s"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}: must be >= 1")
        if not 1024 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise SettingsError("max_body_bytes: must be 1024 to 16777216")
        if not 10 <= self.client_secret_ttl_s <= 7200:
            raise SettingsError("client_secret_ttl_s: must be 10 to 7200")
        try:
            self.keyring()
        except ValueError as exc:
            raise SettingsError(f"ufrag_keys: {exc}") from None
        for key in self.api_keys:
            if len(key) < 16 or key.startswith("ek_"):
                raise SettingsError("api_keys: keys need >= 16 chars and must not start with ek_")
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise SettingsError(f"trusted_proxies: {cidr!r} is not a CIDR") from None
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("redis_url: expected redis://, rediss:// or unix://")

    def keyring(self) -> Keyring:
        """The ufrag keyring; relays must hold the same keys (current and previous)."""
        return Keyring.parse(
            self.ufrag_keys, self.ufrag_current_key_id if self.ufrag_current_key_id else None
        )

    @property
    def uses_dev_keyring(self) -> bool:
        return self.ufrag_keys == DEV_KEYRING_SPEC
