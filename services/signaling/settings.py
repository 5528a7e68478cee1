"""Settings of the signaling service (flags, TOML file, VOICEEDGE_SIGNALING_* environment).

The API key is the exception: `VOICEEDGE_API_KEY` (no service prefix) is read by the entry
point in addition to `api_keys`, so one variable serves every tool and client.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from libs.config.settings import ServiceSettings, SettingsError, host_port, redis_url, setting
from libs.wire.ufrag import DEV_KEYRING_SPEC, Keyring
from services.geosteer.target import geosteer_target


def _api_key(key: str) -> str:
    if len(key) < 16 or key.startswith("ek_"):
        raise ValueError("keys need >= 16 chars and must not start with ek_")
    return key


def _cidr(text: str) -> object:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignalingSettings(ServiceSettings):
    """Settings of the signaling service."""

    grpc_listen: str = setting(
        "127.0.0.1:50053", "host:port of the gRPC server (port 0: any free)", parse=host_port
    )
    http_listen: str = setting(
        "127.0.0.1:8080", "host:port of the public HTTP API (port 0: any free)", parse=host_port
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "accepted API keys, comma separated (VOICEEDGE_API_KEY adds one; none at all: a dev "
        "key is generated and printed)",
        parse=_api_key,
        what="each >= 16 chars, not ek_",
    )
    geosteer_address: str = setting(
        "127.0.0.1:50051",
        "geosteer: host:port, a DNS name with every replica's address, or comma-separated "
        "IP:port of each replica",
        parse=geosteer_target,
    )
    geosteer_timeout_s: float = setting(2.0, "deadline of one RouteSession call", gt=0)
    node_watch_retry_s: float = setting(
        1.0,
        "wait before reopening geosteer's WatchTopology stream (calls of transceivers that "
        "leave it are ended at once) after it broke",
        gt=0,
    )
    create_session_timeout_s: float = setting(
        5.0, "deadline of one transceiver CreateSession call", gt=0
    )
    max_transceiver_attempts: int = setting(
        3, "ranked transceivers tried per call before giving up", ge=1
    )
    max_cluster_attempts: int = setting(
        2,
        "clusters tried per call: when every transceiver of the one geosteer chose refuses, "
        "geosteer is asked again without it (1: no second cluster)",
        ge=1,
    )
    ufrag_keys: str = setting(
        DEV_KEYRING_SPEC, "ufrag keyring '<id>:<hex>,...' (default: the public dev key)"
    )
    ufrag_current_key_id: int = setting(
        0, "key id used to mint new ufrags; 0: the highest id", ge=0, le=255
    )
    max_body_bytes: int = setting(
        65536, "largest accepted request body (413 above)", ge=1024, le=16 * 1024 * 1024
    )
    redis_url: str = setting(
        "",
        "redis://host:port/db for call state; empty: in memory",
        parse=redis_url,
        optional=True,
    )
    call_retention_s: float = setting(
        86400.0, "how long a call record is kept after creation", gt=0
    )
    client_secret_ttl_s: int = setting(600, "default lifetime of an ephemeral key", ge=10, le=7200)
    rate_per_key_per_s: float = setting(
        20.0, "sustained requests per second per API/ephemeral key", gt=0
    )
    burst_per_key: int = setting(40, "request burst allowed per key", ge=1)
    rate_per_ip_per_s: float = setting(10.0, "sustained requests per second per client IP", gt=0)
    burst_per_ip: int = setting(20, "request burst allowed per client IP", ge=1)
    trusted_proxies: tuple[str, ...] = setting(
        (), "CIDRs whose X-Forwarded-For is believed, comma separated", parse=_cidr
    )
    cors_origins: tuple[str, ...] = setting(("*",), "origins allowed by CORS ('*': any)")
    demo_page: bool = setting(
        False,
        "serve the demo page at / and mint client secrets for it at POST /demo/client_secret "
        "(loopback peers only; a development aid)",
    )
    header_timeout_s: float = setting(
        10.0,
        "a connection must send a whole request head within this long of opening (and of "
        "its previous request); slower ones are closed (slow-loris)",
        gt=0,
        le=300,
    )
    body_timeout_s: float = setting(
        10.0, "time to receive a request body once its head arrived (408 beyond)", gt=0, le=300
    )
    max_connections_per_ip: int = setting(
        64,
        "open HTTP connections allowed per client address (trusted proxies exempt); more "
        "are closed at once",
        ge=1,
    )
    max_json_depth: int = setting(
        32, "deepest nesting accepted in a JSON body or session part (400 beyond)", ge=2, le=256
    )
    retry_after_s: int = setting(2, "Retry-After of 503 answers when no cluster has capacity", ge=1)

    def validate(self) -> None:
        super().validate()
        # The keyring rule ties two fields: the current key id must be one of the keys.
        try:
            self.keyring()
        except ValueError as exc:
            raise SettingsError(f"ufrag_keys: {exc}") from None

    def keyring(self) -> Keyring:
        """The ufrag keyring; relays must hold the same keys (current and previous)."""
        return Keyring.parse(
            self.ufrag_keys, self.ufrag_current_key_id if self.ufrag_current_key_id else None
        )

    @property
    def uses_dev_keyring(self) -> bool:
        return self.ufrag_keys == DEV_KEYRING_SPEC
