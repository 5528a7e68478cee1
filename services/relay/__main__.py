"""Relay: the stateless single-port UDP edge that routes on the ICE ufrag.

Run: ./bazelw run //services/relay -- --help
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import uvloop

from libs.observability.telemetry import Telemetry, log_event
from libs.service.runtime import ServiceParts, Servicer, service_main
from libs.wire import ufrag
from services.relay.admin import RelayAdmin, RelayState, register_metrics
from services.relay.dataplane import DataPlane
from services.relay.router import Router
from services.relay.settings import RelaySettings
from services.relay.store import make_binding_store
from services.relay.topology import cancel_and_wait, make_topology_source
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

logger = logging.getLogger("voiceedge.relay")


async def build(settings: RelaySettings, telemetry: Telemetry) -> ServiceParts:
    if settings.ufrag_keys == ufrag.DEV_KEYRING_SPEC:
        log_event(logger, "relay.dev_keyring", level=logging.WARNING, detail="never in production")
    if settings.workers != 1:
        log_event(
            logger,
            "relay.workers_unsupported",
            level=logging.WARNING,
            workers=settings.workers,
            detail="running one worker",
        )
    keyring = ufrag.Keyring.parse(settings.ufrag_keys)
    source = make_topology_source(settings.transceivers, settings.geosteer_address)
    router = Router(
        keyring,
        source.current(),
        idle_timeout_s=settings.idle_timeout_s,
        max_bindings=settings.max_bindings,
        verify_message_integrity=settings.verify_message_integrity,
    )
    store = make_binding_store(settings.redis_url, settings.binding_ttl_s, settings.redis_timeout_s)
    plane = DataPlane(
        router,
        store,
        udp_listen=settings.udp_listen,
        internal_listen=settings.internal_listen,
        binding_ttl_s=settings.binding_ttl_s,
        redis_max_inflight=settings.redis_max_inflight,
    )
    try:
        await plane.start()
    except BaseException:
        await store.close()
        raise
    watch = asyncio.get_running_loop().create_task(source.run(router.set_topology))
    state = RelayState([plane], store, settings.drain_grace_s)
    register_metrics(telemetry.meter, state)

    async def drain(grace_s: float) -> None:
        state.start_drain(grace_s)
        await state.wait_drained()

    async def close() -> None:
        await cancel_and_wait(watch)
        await state.close()
        await plane.close()
        await store.close()

    full_name = relay_pb2.DESCRIPTOR.services_by_name["RelayAdminService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(
                full_name, relay_pb2_grpc.add_RelayAdminServiceServicer_to_server, RelayAdmin(state)
            )
        ],
        drain=drain,
        close=close,
        ready={"udp": list(plane.public_addresses), "internal": plane.internal_address},
    )


def main(argv: Sequence[str] | None = None) -> int:
    # uvloop's datagram path is several times faster than the default loop's (BENCHMARKS.md).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return service_main(
        argv, name="relay", settings_cls=RelaySettings, description=__doc__ or "", build=build
    )


if __name__ == "__main__":
    sys.exit(main())
