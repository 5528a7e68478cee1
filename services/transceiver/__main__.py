"""Transceiver: owns WebRTC (ICE, DTLS, SRTP, Opus) for many sessions on one internal UDP port.

Run: ./bazelw run //services/transceiver -- --help
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main, unimplemented_servicer
from services.transceiver.settings import TransceiverSettings
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc


async def build(settings: TransceiverSettings, telemetry: Telemetry) -> ServiceParts:
    servicer = unimplemented_servicer(transceiver_pb2_grpc.TransceiverServiceServicer)
    full_name = transceiver_pb2.DESCRIPTOR.services_by_name["TransceiverService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(
                full_name, transceiver_pb2_grpc.add_TransceiverServiceServicer_to_server, servicer
            )
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv,
        name="transceiver",
        settings_cls=TransceiverSettings,
        description=__doc__ or "",
        build=build,
    )


if __name__ == "__main__":
    sys.exit(main())
