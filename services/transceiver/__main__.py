"""Transceiver: owns WebRTC (ICE, DTLS, SRTP, Opus) for many sessions on one internal UDP port.

Run: ./bazelw run //services/transceiver -- --help
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from libs.config.settings import parse_host_port
from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main
from services.transceiver import aiortc_compat
from services.transceiver.manager import SessionManager
from services.transceiver.servicer import TransceiverServicer
from services.transceiver.settings import TransceiverSettings
from services.transceiver.udpmux import UdpMux
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc


async def build(settings: TransceiverSettings, telemetry: Telemetry) -> ServiceParts:
    aiortc_compat.check_versions()
    aiortc_compat.install_fast_audio_level()
    mux = UdpMux()
    host, port = parse_host_port(settings.media_listen, "media_listen")
    media_host, media_port = await mux.start(host, port)
    manager = SessionManager(settings, mux)
    servicer = TransceiverServicer(manager, settings.drain_grace_s)
    full_name = transceiver_pb2.DESCRIPTOR.services_by_name["TransceiverService"].full_name

    async def drain(grace_s: float) -> None:
        await manager.drain(grace_s)
        await manager.wait_idle()

    return ServiceParts(
        servicers=[
            Servicer(
                full_name, transceiver_pb2_grpc.add_TransceiverServiceServicer_to_server, servicer
            )
        ],
        drain=drain,
        close=manager.shutdown,
        ready={"media": f"{media_host}:{media_port}"},
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
