"""Settings of the relay service (flags, TOML file, VOICEEDGE_RELAY_* environment)."""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelaySettings(ServiceSettings):
    """Settings of the relay service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50054",
        metadata={"help": "host:port of the gRPC server (port 0: any free)"},
    )
