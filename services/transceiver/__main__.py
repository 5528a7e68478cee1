"""Transceiver: owns WebRTC (ICE, DTLS, SRTP, Opus) for many sessions on one internal UDP port.

Run: ./bazelw run //services/transceiver -- --help
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import uvloop

from libs.config.settings import parse_host_port
from libs.observability.telemetry import Telemetry
from libs.service.runtime import ServiceParts, Servicer, service_main
from services.geosteer.client import HeartbeatLoop, NodeReport, ProcessCpuMeter
from services.transceiver import aiortc_compat, opus
from services.transceiver.manager import SessionManager
from services.transceiver.rtt_report import RttCollector
from services.transceiver.servicer import TransceiverServicer
from services.transceiver.settings import TransceiverSettings
from services.transceiver.udpmux import UdpMux
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

# How long the gRPC server still answers after deregistering, when it closed sessions.
DEREGISTERED_ANSWER_S = 1.0


async def live_sessions(manager: SessionManager) -> list[transceiver_pb2.SessionInfo]:
    sessions, _ = await manager.list(1000, "")
    infos = [await s.info() for s in sessions]
    return [i for i in infos if i.state != transceiver_pb2.SESSION_STATE_CLOSED]


async def build(settings: TransceiverSettings, telemetry: Telemetry) -> ServiceParts:
    aiortc_compat.check_versions()
    opus.lib()  # no libopus: fail at start-up with the package to install, not per call
    mux = UdpMux(control_first=settings.mux_control_first)
    host, port = parse_host_port(settings.media_listen, "media_listen")
    media_host, media_port = await mux.start(host, port)
    manager = SessionManager(settings, mux, telemetry.meter)
    reporter: HeartbeatLoop | None = None
    rtts = RttCollector(lambda: live_sessions(manager), settings.rtt_report_interval_s)

    async def started(grpc_address: str) -> None:
        nonlocal reporter
        reporter = start_reporter(settings, manager, (media_host, media_port), grpc_address, rtts)
        if reporter is not None:
            rtts.start()

    servicer = TransceiverServicer(manager, settings.drain_grace_s)
    full_name = transceiver_pb2.DESCRIPTOR.services_by_name["TransceiverService"].full_name

    async def drain(grace_s: float) -> None:
        await manager.drain(grace_s)
        if reporter is not None:
            await reporter.report_now()
        await manager.wait_idle()

    async def close() -> None:
        await rtts.close()
        # Sessions first, while geosteer (and so every relay) still lists this node: the
        # callers' last event and DTLS close alert must still be forwarded to them.
        closing = manager.active
        await manager.close_all(common_pb2.CLOSE_REASON_DRAINED)
        if reporter is not None:
            await reporter.close()  # deregisters from geosteer, closes the channel
            if closing:
                # Signaling ends the calls of a node that left geosteer, asking it for each
                # session's close reason: still answer (DRAINED), or it records NODE_LOST.
                await asyncio.sleep(DEREGISTERED_ANSWER_S)
        await manager.shutdown()

    return ServiceParts(
        servicers=[
            Servicer(
                full_name, transceiver_pb2_grpc.add_TransceiverServiceServicer_to_server, servicer
            )
        ],
        drain=drain,
        close=close,
        ready={"media": f"{media_host}:{media_port}"},
        started=started,
    )


def start_reporter(
    settings: TransceiverSettings,
    manager: SessionManager,
    media: tuple[str, int],
    grpc_address: str,
    rtts: RttCollector,
) -> HeartbeatLoop | None:
    """Registers with geosteer and heartbeats, if geosteer_address is set."""
    if not settings.geosteer_address:
        return None
    media_ip, media_port = media
    if settings.media_advertise:
        media_ip, media_port = parse_host_port(settings.media_advertise, "media_advertise")
    node = geosteer_pb2.Node(
        node_id=settings.node_id or f"transceiver-{settings.cluster_id}-{settings.transceiver_id}",
        kind=common_pb2.NODE_KIND_TRANSCEIVER,
        cluster_id=settings.cluster_id,
        transceiver_id=settings.transceiver_id,
        grpc_address=settings.grpc_advertise or grpc_address,
        media_address=common_pb2.SocketAddress(ip=media_ip, port=media_port),
        capacity_sessions=settings.max_sessions,
    )
    cpu = ProcessCpuMeter()
    reporter = HeartbeatLoop.to_address(
        settings.geosteer_address,
        node,
        lambda: NodeReport(
            active_sessions=manager.active,
            capacity_sessions=settings.max_sessions,
            # A transceiver whose bridge cannot be reached takes no new calls: geosteer
            # stops choosing it (as while it drains) and relays still carry its calls.
            draining=manager.draining or manager.bridges.failing(settings.bridge_address),
            cpu_load=cpu.read(),
            rtt_samples=rtts.take(),
        ),
    )
    manager.on_draining = reporter.poke
    reporter.start()
    return reporter


def main(argv: Sequence[str] | None = None) -> int:
    # uvloop: the per-datagram, per-timer and per-task loop overhead aiortc's media path
    # pays ~2x per packet is cheaper than on the default loop (BENCHMARKS.md, transceiver).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return service_main(
        argv,
        name="transceiver",
        settings_cls=TransceiverSettings,
        description=__doc__ or "",
        build=build,
    )


if __name__ == "__main__":
    sys.exit(main())
