"""A gRPC service process: settings, logging, telemetry, health and reflection, the
`StatusError` mapping, the readiness line, graceful drain.

Every entry point's `main(argv)` calls `service_main` with its settings class and a `build`
coroutine returning its `ServiceParts` (servicers and lifecycle hooks); `service_main` loads
the settings (exit 2 on a bad one), serves a `GrpcService` and runs `run_until_signal`.
First SIGTERM/SIGINT drains: health turns NOT_SERVING, the service's drain hook lets
sessions finish up to `drain_grace_s`, then the server stops. A second signal forces an
immediate stop. `close()` is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

# Public as grpc_health.v1.health.aio; mypy cannot follow that re-export.
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.config.settings import ServiceSettings, SettingsError, load_settings
from libs.observability.telemetry import Telemetry, configure_logging, log_event, setup_telemetry
from libs.service.aio import cancel_and_wait
from libs.service.auth import TokenServerInterceptor
from libs.service.errors import StatusErrorInterceptor
from libs.service.tokens import TokenError, token_from_env

logger = logging.getLogger("voiceedge.service")

S = TypeVar("S", bound=ServiceSettings)

EXIT_OK = 0
EXIT_FORCED = 130


@dataclass(frozen=True)
class Servicer:
    """One gRPC service to mount: its full name, the generated add_* function, the object."""

    full_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    implementation: object


# Clients may keep a connection alive with HTTP/2 pings as often as every 5 s while a call
# is open (gRPC's default answers more than one ping per 5 minutes with GOAWAY
# too_many_pings): geosteer's clients ping every 10 s to notice a replica that vanished
# without closing its connections (services/geosteer/client.py).
SERVER_OPTIONS = (("grpc.http2.min_ping_interval_without_data_ms", 5000),)


def new_server(token: str = "") -> grpc.aio.Server:
    """A gRPC server with the interceptors every voiceedge server has: the internal token
    check when `token` is set (libs/service/auth.py), then the StatusError mapping. Test
    servers use it too, so they answer refusals exactly as a service does."""
    interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
    if token:
        interceptors.append(TokenServerInterceptor(token))
    interceptors.append(StatusErrorInterceptor())
    return grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)


class GrpcService:
    """An asyncio gRPC server with grpc.health.v1 and reflection for the given servicers.

    With a `token`, every call but health checks must carry it (libs/service/auth.py)."""

    def __init__(
        self, name: str, listen: str, servicers: Sequence[Servicer], *, token: str = ""
    ) -> None:
        self.name = name
        self._listen = listen
        self._servicers = list(servicers)
        self._token = token
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self.port = 0
        self._closed = False

    @property
    def address(self) -> str:
        host = self._listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        server = new_server(self._token)
        for servicer in self._servicers:
            servicer.add_to_server(servicer.implementation, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [s.full_name for s in self._servicers]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind gRPC on {self._listen}")
        await server.start()
        self._server = server
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *(s.full_name for s in self._servicers)]:
            await self._health.set(name, status)

    async def set_service_serving(self, name: str, serving: bool) -> None:
        """The health of one service name only (e.g. degraded but still serving)."""
        await self._health.set(
            name,
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def close(self, grace_s: float = 0.0) -> None:
        if self._closed or self._server is None:
            return
        self._closed = True
        await self._server.stop(grace_s)


DrainHook = Callable[[float], Awaitable[None]]


def print_ready(service: str, **endpoints: Any) -> None:
    """One JSON line on stdout once every listener is bound: tests and the demo read it."""
    print(json.dumps({"event": "ready", "service": service, **endpoints}), flush=True)


async def run_until_signal(
    grpc_service: GrpcService,
    *,
    drain_grace_s: float,
    drain: DrainHook | None = None,
    close: Callable[[], Awaitable[None]] | None = None,
    ready: dict[str, Any] | None = None,
) -> int:
    """Serves until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    first = asyncio.Event()
    second = asyncio.Event()

    def on_signal() -> None:
        (second if first.is_set() else first).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        print_ready(grpc_service.name, grpc=grpc_service.address, **(ready or {}))
        log_event(
            logger, "service.ready", service__name=grpc_service.name, grpc=grpc_service.address
        )
        await first.wait()
        log_event(
            logger, "service.draining", service__name=grpc_service.name, grace_s=drain_grace_s
        )
        await grpc_service.set_serving(False)
        forced = asyncio.ensure_future(second.wait())
        drained = asyncio.ensure_future(_drain(drain, drain_grace_s))
        done, _ = await asyncio.wait({forced, drained}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(forced, drained)
        code = EXIT_FORCED if forced in done else EXIT_OK
        if close is not None:
            await close()
        await grpc_service.close(0.0 if code == EXIT_FORCED else 1.0)
        log_event(logger, "service.stopped", service__name=grpc_service.name, exit_code=code)
        return code
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _drain(drain: DrainHook | None, grace_s: float) -> None:
    if drain is None:
        return
    try:
        await asyncio.wait_for(drain(grace_s), timeout=grace_s)
    except TimeoutError:
        log_event(logger, "service.drain_timeout", level=logging.WARNING, grace_s=grace_s)


def exit_on_settings_error(prog: str, message: str) -> int:
    """Settings errors are the user's to fix: one clear line, exit status 2 (as argparse)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


@dataclass
class ServiceParts:
    """What a service adds to the common process: servicers and lifecycle hooks."""

    servicers: Sequence[Servicer]
    drain: DrainHook | None = None
    close: Callable[[], Awaitable[None]] | None = None
    ready: dict[str, Any] | None = None
    # Called with the bound gRPC address ("host:port") once the server listens: what a
    # service announces to others (geosteer registration) must carry the real port.
    started: Callable[[str], Awaitable[None]] | None = None
    # Called once the server listens with a setter of one service name's health
    # (name, serving): a service reports a degraded part without leaving "" SERVING.
    health: Callable[[Callable[[str, bool], Coroutine[Any, Any, None]]], None] | None = None


def service_main(
    argv: Sequence[str] | None,
    *,
    name: str,
    settings_cls: type[S],
    description: str,
    build: Callable[[S, Telemetry], Awaitable[ServiceParts]],
) -> int:
    """The whole life of a service process: settings, logging, telemetry, serve, drain."""
    try:
        settings = load_settings(
            settings_cls,
            argv,
            env_prefix=f"VOICEEDGE_{name.upper()}_",
            prog=name,
            description=description,
        )
        token = token_from_env()
    except (SettingsError, TokenError) as exc:
        return exit_on_settings_error(name, str(exc))
    configure_logging(settings.log_level)
    return asyncio.run(_serve(name, settings, build, token))


async def serve(
    name: str, settings: S, build: Callable[[S, Telemetry], Awaitable[ServiceParts]]
) -> int:
    """`service_main` after its settings and logging, inside a running loop: for an entry
    point that starts something before this module is even imported (the relay's data
    plane forwards before gRPC and telemetry load). Returns the exit code."""
    try:
        token = token_from_env()
    except TokenError as exc:
        return exit_on_settings_error(name, str(exc))
    return await _serve(name, settings, build, token)


async def _serve(
    name: str,
    settings: S,
    build: Callable[[S, Telemetry], Awaitable[ServiceParts]],
    token: str,
) -> int:
    telemetry = setup_telemetry(name, settings.metrics_listen, settings.otlp_endpoint)
    try:
        try:
            parts = await build(settings, telemetry)
        except (SettingsError, TokenError) as exc:
            # What only the build can check (a secret from the environment): the same one
            # clear line and exit status as a bad setting.
            return exit_on_settings_error(name, str(exc))
        service = GrpcService(name, settings.grpc_listen, parts.servicers, token=token)
        if not token:
            log_event(logger, "service.internal_plane_open", service__name=name)
        try:
            await service.start()
        except BaseException:
            if parts.close is not None:
                await parts.close()
            raise
        if parts.started is not None:
            await parts.started(service.address)
        if parts.health is not None:
            parts.health(service.set_service_serving)
        ready = dict(parts.ready or {})
        if telemetry.metrics_port:
            ready["metrics"] = (
                f"{settings.metrics_listen.rpartition(':')[0]}:{telemetry.metrics_port}"
            )
        return await run_until_signal(
            service,
            drain_grace_s=settings.drain_grace_s,
            drain=parts.drain,
            close=parts.close,
            ready=ready,
        )
    finally:
        telemetry.shutdown()
