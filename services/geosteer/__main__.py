"""Geosteer: routes each new session to the nearest healthy cluster with capacity.

Run: ./bazelw run //services/geosteer -- --help
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main
from services.geosteer.servicer import Geosteer
from services.geosteer.settings import GeosteerSettings
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc


async def build(settings: GeosteerSettings, telemetry: Telemetry) -> ServiceParts:
    # Topology and GeoIP load before the server starts, so health turns SERVING only
    # once routing can answer.
    geosteer = Geosteer(settings, telemetry=telemetry)
    geosteer.start()
    full_name = geosteer_pb2.DESCRIPTOR.services_by_name["GeosteerService"].full_name
    setter: Callable[[str, bool], Coroutine[Any, Any, None]] | None = None

    async def set_serving(serving: bool) -> None:
        # The whole process: with its registry unreachable nothing it serves works.
        if setter is not None:
            for name in ("", full_name):
                await setter(name, serving)

    def health(set_health: Callable[[str, bool], Coroutine[Any, Any, None]]) -> None:
        nonlocal setter
        setter = set_health
        geosteer.report_health(set_serving)

    async def drain(grace_s: float) -> None:
        await geosteer.stop_health()
        await set_serving(False)  # a change reported while the drain began is undone

    return ServiceParts(
        servicers=[
            Servicer(
                full_name,
                geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server,
                geosteer.servicer,
            )
        ],
        drain=drain,
        close=geosteer.close,
        ready={
            "clusters": len(geosteer.directory.clusters),
            "geoip": geosteer.locator.description,
        },
        health=health,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv, name="geosteer", settings_cls=GeosteerSettings, description=__doc__ or "", build=build
    )


if __name__ == "__main__":
    sys.exit(main())
