"""The one place signaling reaches into aiohttp's server internals (pinned aiohttp 3.14).

What aiohttp does not offer through its public API, and a public endpoint needs:
- **JSON errors from every layer.** A request aiohttp's own parser rejects (a 100 KiB
  header, 5000 headers, a bad Content-Length) or an exception no middleware caught is
  answered by `RequestHandler.handle_error` with a plain-text body. Ours answers with
  OpenAI's JSON error shape, like every other error of the API.
- **A cap on open connections per client IP**, counted where connections are made, so a
  slow-loris from one address cannot hold every file descriptor. Trusted proxies, which
  carry many clients, are exempt.

The header deadline needs no private API: aiohttp's `keepalive_timeout` also runs from
the moment a connection opens until its first request is parsed, so it is the header
timeout (see `guarded_runner`). `private_api_test` fails loudly if what we lean on moves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web, web_log, web_protocol

from libs.observability.telemetry import log_event
from libs.service.errors import StatusError
from services.signaling import errors

logger = logging.getLogger("voiceedge.signaling.http")

TESTED_AIOHTTP = "3.14."
LINGER_S = 1.0


def error_body_response(status: int, message: str) -> web.Response:
    """An aiohttp-level error (the request never reached a handler) in the JSON shape."""
    if status >= 500:
        error: StatusError = errors.server_error(
            "The server had an error while processing your request."
        )
    else:
        code = {413: "request_too_large", 431: "headers_too_large"}.get(status, "invalid_request")
        error = errors.bad_request(code, message, http_status=status)
    response = web.json_response(error.body(), status=error.http_status)
    response.force_close()
    return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Bad request"


class _JsonErrorRequestHandler(web_protocol.RequestHandler):
    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        # Some data already got sent: the connection is broken, as aiohttp itself decides.
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        text = (message or "").strip().splitlines()
        return error_body_response(status, text[0] if text else _phrase(status))


class GuardedServer(web.Server):
    """aiohttp's low-level server with JSON error bodies and a per-IP connection cap."""

    def __init__(
        self,
        *args: Any,
        max_connections_per_ip: int,
        exempt: Callable[[str], bool],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._max_per_ip = max_connections_per_ip
        self._exempt = exempt
        self._per_ip: dict[str, int] = {}
        self._ip_of: dict[web_protocol.RequestHandler, str] = {}
        self.refused_connections = 0

    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(
        self, handler: web_protocol.RequestHandler, transport: asyncio.Transport
    ) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not ip or self._exempt(ip):
            return
        count = self._per_ip.get(ip, 0) + 1
        self._per_ip[ip] = count
        self._ip_of[handler] = ip
        if count > self._max_per_ip:
            self.refused_connections += 1
            log_event(
                logger,
                "http.connection_refused",
                level=logging.WARNING,
                client__address=ip,
                open_connections=count - 1,
            )
            transport.abort()

    def connection_lost(
        self, handler: web_protocol.RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        ip = self._ip_of.pop(handler, None)
        if ip is not None:
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    def open_connections(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GuardedServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections_per_ip: int,
        exempt: Callable[[str], bool],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._guard = {"max_connections_per_ip": max_connections_per_ip, "exempt": exempt}

    async def _make_server(self) -> web.Server:
        # AppRunner._make_server, with our server class (aiohttp 3.14).
        loop = asyncio.get_running_loop()
        app = self._app
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        kwargs: dict[str, Any] = dict(self._kwargs)
        kwargs["debug"] = app._debug
        kwargs.setdefault("access_log_class", web_log.AccessLogger)
        kwargs.update(app._handler_args or {})
        return GuardedServer(
            app._handle,
            request_factory=app._make_request,
            loop=loop,
            **self._guard,  # type: ignore[arg-type]
            **kwargs,
        )

    @property
    def guarded(self) -> GuardedServer:
        server = self.server
        assert isinstance(server, GuardedServer)
        return server


def guarded_runner(
    app: web.Application,
    *,
    header_timeout_s: float,
    max_connections_per_ip: int,
    exempt: Callable[[str], bool],
) -> GuardedAppRunner:
    """The runner signaling serves with. `keepalive_timeout` bounds both the wait for a
    connection's first complete request head (aiohttp arms it at connection_made) and the
    idle time between requests: a client dribbling its headers is cut off at the deadline."""
    return GuardedAppRunner(
        app,
        access_log=None,
        keepalive_timeout=header_timeout_s,
        # After an answer sent before the body was read (413, 408), read and drop what is
        # left for at most this long, so the client sees the answer, then close; aiohttp's
        # default of 10 s is ten seconds a slow client holds the connection for nothing.
        lingering_time=LINGER_S,
        max_connections_per_ip=max_connections_per_ip,
        exempt=exempt,
    )


def version_is_tested() -> bool:
    return aiohttp.__version__.startswith(TESTED_AIOHTTP)
