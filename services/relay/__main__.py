"""Relay: the stateless single-port UDP edge that routes on the ICE ufrag.

Run: ./bazelw run //services/relay -- --help
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main, unimplemented_servicer
from services.relay.settings import RelaySettings
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc


async def build(settings: RelaySettings, telemetry: Telemetry) -> ServiceParts:
    servicer = unimplemented_servicer(relay_pb2_grpc.RelayAdminServiceServicer)
    full_name = relay_pb2.DESCRIPTOR.services_by_name["RelayAdminService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(full_name, relay_pb2_grpc.add_RelayAdminServiceServicer_to_server, servicer)
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv, name="relay", settings_cls=RelaySettings, description=__doc__ or "", build=build
    )


if __name__ == "__main__":
    sys.exit(main())
