"""Settings of the geosteer service (flags, TOML file, VOICEEDGE_GEOSTEER_* environment)."""

from __future__ import annotations

import dataclasses

from libs.config.settings import ServiceSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeosteerSettings(ServiceSettings):
    """Settings of the geosteer service."""

    grpc_listen: str = dataclasses.field(
        default="127.0.0.1:50051",
        metadata={"help": "host:port of the gRPC server (port 0: any free)"},
    )
