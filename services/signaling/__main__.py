"""Signaling: the public call API (OpenAI Realtime compatible HTTP, WHIP) and its gRPC mirror.

Run: ./bazelw run //services/signaling -- --help
The API key comes from VOICEEDGE_API_KEY and/or the api_keys setting; with neither, a dev
key is generated and printed on stderr (and in the ready line as dev_api_key).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiohttp import web

from libs.config.settings import parse_host_port
from libs.observability.telemetry import Telemetry, log_event
from libs.service.runtime import ServiceParts, Servicer, service_main
from libs.service.tokens import check_secret
from services.signaling.calls import CallService
from services.signaling.http_api import build_app, make_runner
from services.signaling.nodewatch import NodeWatch
from services.signaling.servicer import SignalingServicer
from services.signaling.settings import SignalingSettings
from services.signaling.store import make_store
from voiceedge.signaling.v1 import signaling_pb2, signaling_pb2_grpc

logger = logging.getLogger("voiceedge.signaling")

API_KEY_ENV = "VOICEEDGE_API_KEY"


def api_keys(settings: SignalingSettings, environ: Mapping[str, str]) -> tuple[list[str], str]:
    """The accepted keys, and the generated dev key ("" if keys were configured)."""
    keys = list(settings.api_keys)
    for key in keys:
        check_secret("api_keys", key)
    if environ.get(API_KEY_ENV):
        check_secret(API_KEY_ENV, environ[API_KEY_ENV])
        keys.append(environ[API_KEY_ENV])
    if keys:
        return keys, ""
    dev_key = "sk-voiceedge-dev-" + secrets.token_urlsafe(24)
    return [dev_key], dev_key


# web/demo/index.html, next to this package in the runfiles (data of //services/signaling).
DEMO_PAGE = Path(os.path.abspath(__file__)).parents[2] / "web" / "demo" / "index.html"


async def build(settings: SignalingSettings, telemetry: Telemetry) -> ServiceParts:
    keys, dev_key = api_keys(settings, os.environ)
    if dev_key:
        print(f"signaling: no API key configured; dev key: {dev_key}", file=sys.stderr)
    if settings.uses_dev_keyring:
        log_event(
            logger,
            "ufrag.dev_keyring",
            level=logging.WARNING,
            detail="minting ufrags with the public dev key; set ufrag_keys in production",
        )
    service = CallService(
        api_keys=keys,
        keyring=settings.keyring(),
        store=make_store(settings.redis_url, settings.call_retention_s),
        settings=settings,
        tracer=telemetry.tracer,
        meter=telemetry.meter,
    )
    app = build_app(
        service,
        demo_page=DEMO_PAGE if settings.demo_page else None,
        demo_api_key=keys[0],
    )
    runner = make_runner(app)
    await runner.setup()
    host, port = parse_host_port(settings.http_listen, "http_listen")
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await service.close()
        raise
    bound = runner.addresses[0][1]
    nodes = NodeWatch(service.geosteer, service.end_calls_on, settings.node_watch_retry_s)
    nodes.start()

    async def drain(grace_s: float) -> None:
        del grace_s  # calls live on transceivers; signaling only stops taking new ones
        service.draining = True

    async def close() -> None:
        await nodes.close()
        await runner.cleanup()
        await service.close()

    ready: dict[str, object] = {"http": f"{host}:{bound}"}
    if dev_key:
        ready["dev_api_key"] = dev_key
    full_name = signaling_pb2.DESCRIPTOR.services_by_name["SignalingService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(
                full_name,
                signaling_pb2_grpc.add_SignalingServiceServicer_to_server,
                SignalingServicer(service),
            )
        ],
        drain=drain,
        close=close,
        ready=ready,
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
