"""Signaling: the public call API (OpenAI Realtime compatible HTTP, WHIP) and its gRPC mirror.

Run: ./bazelw run //services/signaling -- --help
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main, unimplemented_servicer
from services.signaling.settings import SignalingSettings
from voiceedge.signaling.v1 import signaling_pb2, signaling_pb2_grpc


async def build(settings: SignalingSettings, telemetry: Telemetry) -> ServiceParts:
    servicer = unimplemented_servicer(signaling_pb2_grpc.SignalingServiceServicer)
    full_name = signaling_pb2.DESCRIPTOR.services_by_name["SignalingService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(full_name, signaling_pb2_grpc.add_SignalingServiceServicer_to_server, servicer)
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv,
        name="signaling",
        settings_cls=SignalingSettings,
        description=__doc__ or "",
        build=build,
    )


if __name__ == "__main__":
    sys.exit(main())
