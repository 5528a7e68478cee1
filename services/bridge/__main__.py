"""Inference bridge: the backend side of the per-session audio and event stream.

Run: ./bazelw run //services/bridge -- --help
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main
from services.bridge import listen
from services.bridge.pipecat_loader import preload
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc


async def build(settings: BridgeSettings, telemetry: Telemetry) -> ServiceParts:
    if settings.backend == "pipecat":
        await preload(settings)
    if settings.backend == "listen":
        await listen.preload(settings)
    servicer = BridgeServicer(settings, telemetry)

    async def close() -> None:
        await servicer.close()
        await listen.close_pool()

    full_name = inference_pb2.DESCRIPTOR.services_by_name["InferenceBridgeService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(
                full_name, inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server, servicer
            )
        ],
        drain=servicer.drain,
        close=close,
        ready={"backend": settings.backend},
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv, name="bridge", settings_cls=BridgeSettings, description=__doc__ or "", build=build
    )


if __name__ == "__main__":
    sys.exit(main())
