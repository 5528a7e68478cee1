"""Settings of the transceiver service (flags, TOML file, VOICEEDGE_TRANSCEIVER_* environment)."""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransceiverSettings(ServiceSettings):
    """Settings of the transceiver service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50052",
        metadata={"help": "host:port of the gRPC server (port 0: any free)"},
    )
