"""The public HTTP API: OpenAI Realtime WebRTC calls, client secrets, and WHIP (RFC 9725).

Thin: it parses requests, picks the client IP, and renders CallService results and
StatusErrors; the flow lives in calls.py.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from aiohttp import WSCloseCode, WSMsgType, web

from libs.observability.telemetry import log_event
from libs.service.errors import StatusError
from services.signaling import errors
from services.signaling.aiohttp_compat import GuardedAppRunner, guarded_runner
from services.signaling.calls import CallService, Principal, SidebandCall, etag_of
from services.signaling.clientip import client_ip, parse_networks
from services.signaling.sdp import SDPFRAG, OfferError, parse_sdpfrag
from voiceedge.transceiver.v1 import transceiver_pb2

logger = logging.getLogger("voiceedge.signaling.http")

SDP = "application/sdp"
CALLS = "/v1/realtime/calls"
WHIP = "/whip"
EXPOSED_HEADERS = "Location, Retry-After, Link, ETag"
# Request headers a browser may send cross-origin (a preflight gets back those it asked
# for that are here): ours, and what OpenAI's browser SDKs always send (the Agents SDK's
# X-OpenAI-Agents-SDK, the openai package's OpenAI-* and X-Stainless-* headers).
ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "if-match",
        "x-openai-agents-sdk",
        "openai-beta",
        "openai-organization",
        "openai-project",
        "x-request-id",
    }
)
ALLOWED_HEADER_PREFIXES = ("x-stainless-",)
# The answer to a preflight that names no headers.
DEFAULT_ALLOWED_HEADERS = "Authorization, Content-Type, If-Match"
# A sideband client event larger than this closes the WebSocket (1009, message too big).
SIDEBAND_MAX_MESSAGE_BYTES = 1 << 20

FORM_PARSE_THREADS = 4

SERVICE_KEY: web.AppKey[CallService] = web.AppKey("service", CallService)


def error_response(exc: StatusError) -> web.Response:
    """The one place a StatusError becomes an HTTP answer: OpenAI's JSON error body."""
    return web.json_response(exc.body(), status=exc.http_status, headers=exc.http_headers())


def _http_error(exc: web.HTTPException) -> StatusError:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
    return errors.bad_request(code, exc.reason, http_status=exc.status)


def make_runner(app: web.Application) -> GuardedAppRunner:
    """The runner signaling serves `app` with: JSON errors from every layer, the header
    deadline and the per-IP connection cap of its settings."""
    settings = app[SERVICE_KEY].settings
    proxies = parse_networks(settings.trusted_proxies)

    def exempt(ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in proxies)

    return guarded_runner(
        app,
        header_timeout_s=settings.header_timeout_s,
        max_connections_per_ip=settings.max_connections_per_ip,
        exempt=exempt,
    )


def parse_json(data: bytes | str, max_depth: int, code: str, what: str) -> Any:
    """JSON text -> value; a 400 naming `what` when it is not JSON or nests deeper than
    `max_depth` (the C decoder recurses: deep enough input is a RecursionError, not a
    ValueError, and a merely deep one makes every later walk over it costly)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise errors.bad_request(code, f"{what} is not valid JSON.") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                raise errors.bad_request(code, f"{what} nests deeper than {max_depth} levels.")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return value


def build_app(
    service: CallService,
    *,
    demo_page: Path | None = None,
    demo_api_key: str = "",
) -> web.Application:
    max_body = service.settings.max_body_bytes
    max_depth = service.settings.max_json_depth
    body_timeout_s = service.settings.body_timeout_s
    # Multipart parsing is pure Python and can take a while on a crafted body: it runs in
    # worker threads, a few at a time, so the event loop keeps serving everyone else.
    form_parsers = asyncio.Semaphore(FORM_PARSE_THREADS)
    trusted_proxies = parse_networks(service.settings.trusted_proxies)
    cors_origins = service.settings.cors_origins

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except StatusError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            api_error = _http_error(exc)
            api_error.headers.update({k: v for k, v in exc.headers.items() if k == "Allow"})
            response = error_response(api_error)
        if not response.prepared:  # a WebSocket has sent its headers already
            _cors(request, response, cors_origins)
        return response

    app = web.Application(middlewares=[middleware], client_max_size=max_body)
    app[SERVICE_KEY] = service

    def peer_ip(request: web.Request) -> str:
        return client_ip(
            request.remote, request.headers.getall("X-Forwarded-For", []), trusted_proxies
        )

    async def begin(request: web.Request) -> tuple[Principal, str]:
        ip = peer_ip(request)
        service.check_ip_rate(ip)
        principal = await service.authenticate(request.headers.get("Authorization"))
        service.check_key_rate(principal)
        return principal, ip

    async def read_body(request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > max_body:
            raise _too_large(max_body)
        # Chunked bodies carry no Content-Length: count while reading, stop past the limit.
        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(body_timeout_s):
                while total <= max_body:
                    chunk = await request.content.read(max_body + 1 - total)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
        except TimeoutError:
            raise errors.bad_request(
                "request_timeout",
                f"The request body did not arrive within {body_timeout_s:g} s.",
                http_status=408,
            ) from None
        if total > max_body:
            raise _too_large(max_body)
        return b"".join(chunks)

    async def parse_form(content_type: str, body: bytes) -> tuple[bytes, Any]:
        async with form_parsers:
            sdp, session_text = await asyncio.to_thread(_parse_form, content_type, body)
        return sdp, _session_of(session_text, max_depth)

    async def read_offer(request: web.Request, *, whip: bool) -> tuple[bytes, Any]:
        content_type = request.headers.get("Content-Type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type == SDP:
            return await read_body(request), None
        if media_type == "multipart/form-data" and not whip:
            return await parse_form(content_type, await read_body(request))
        accepted = SDP if whip else f"{SDP} or multipart/form-data"
        raise errors.bad_request(
            "unsupported_content_type", f"Content-Type must be {accepted}.", http_status=415
        )

    async def create(request: web.Request, *, whip: bool) -> web.Response:
        principal, ip = await begin(request)
        offer, session = await read_offer(request, whip=whip)
        created = await service.create_call(principal, offer, session, ip)
        base = WHIP if whip else CALLS
        return web.Response(
            status=201,
            body=created.answer_sdp.encode("utf-8"),
            headers={
                "Content-Type": SDP,
                "Location": f"{base}/{created.call.call_id}",
                "ETag": etag_of(created.call),  # RFC 9725 §4.3.1: the ICE session's tag
            },
        )

    async def post_call(request: web.Request) -> web.Response:
        return await create(request, whip=False)

    async def post_whip(request: web.Request) -> web.Response:
        return await create(request, whip=True)

    async def delete_call(request: web.Request) -> web.Response:
        principal, _ = await begin(request)
        await service.delete_call(principal, request.match_info["call_id"])
        return web.Response(status=204)

    async def hangup_call(request: web.Request) -> web.Response:
        principal, _ = await begin(request)
        call = await service.hangup(principal, request.match_info["call_id"])
        log_event(logger, "call.hangup", call__id=call.call_id, session__id=call.session_id)
        return web.json_response({})

    async def sideband(request: web.Request) -> web.StreamResponse:
        """`GET /v1/realtime?call_id=...`: the call's server events, and client events
        back, for the server that owns the call (OpenAI's sideband connection)."""
        principal, _ = await begin(request)
        call_id = request.query.get("call_id", "")
        if not call_id:
            raise errors.bad_request(
                "missing_call_id",
                "voiceedge's realtime WebSocket joins an existing call: pass call_id.",
            )
        stream = await service.open_sideband(principal, call_id)
        ws = web.WebSocketResponse(max_msg_size=SIDEBAND_MAX_MESSAGE_BYTES, heartbeat=20.0)
        if not ws.can_prepare(request).ok:
            stream.cancel()
            raise errors.bad_request("websocket_required", "This URL takes a WebSocket upgrade.")
        await ws.prepare(request)
        await _pump_sideband(ws, stream, call_id)
        return ws

    async def get_call(request: web.Request) -> web.Response:
        principal, _ = await begin(request)
        call = await service.get_call(principal, request.match_info["call_id"])
        return web.json_response(
            {
                "id": call.call_id,
                "object": "realtime.call",
                "status": call.state,
                "created_at": int(call.created_at),
                "ended_at": int(call.ended_at) or None,
            }
        )

    async def patch_session(request: web.Request) -> web.Response:
        """RFC 9725 §4.3 on the WHIP session URL and the call URL alike: an ICE restart is
        answered 200 with the server's sdpfrag and the new ETag, trickle with 204."""
        principal, _ = await begin(request)
        media_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != SDPFRAG:
            raise errors.bad_request(
                "unsupported_content_type", f"Content-Type must be {SDPFRAG}.", http_status=415
            )
        try:
            frag = parse_sdpfrag(await read_body(request), max_body)
        except OfferError as exc:
            raise errors.bad_request(exc.code, exc.message) from None
        result = await service.patch_call(
            principal, request.match_info["call_id"], frag, request.headers.get("If-Match")
        )
        if result.answer_sdpfrag is None:
            return web.Response(status=204, headers={"ETag": result.etag})
        return web.Response(
            status=200,
            body=result.answer_sdpfrag.encode("utf-8"),
            headers={"Content-Type": SDPFRAG, "ETag": result.etag},
        )

    async def post_client_secret(request: web.Request) -> web.Response:
        principal, _ = await begin(request)
        media_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        body = await read_body(request)
        payload: Any = {}
        if body.strip():
            if media_type != "application/json":
                raise errors.bad_request(
                    "unsupported_content_type",
                    "Content-Type must be application/json.",
                    http_status=415,
                )
            payload = parse_json(body, max_depth, "invalid_json", "Body")
        if not isinstance(payload, dict):
            raise errors.bad_request("invalid_json", "Body must be a JSON object.")
        expires_after = payload.get("expires_after") or {}
        seconds = expires_after.get("seconds", 0) if isinstance(expires_after, dict) else None
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            raise errors.bad_request(
                "invalid_expires_after", "expires_after.seconds must be an integer."
            )
        session = payload.get("session")
        if session is not None and not isinstance(session, dict):
            raise errors.bad_request("invalid_session", "session must be a JSON object.")
        secret = await service.create_client_secret(principal, seconds, session)
        log_event(logger, "client_secret.created", expires_at=int(secret.expires_at))
        return web.json_response(
            {
                "value": secret.value,
                "expires_at": int(secret.expires_at),
                "session": secret.session,
            }
        )

    async def preflight(request: web.Request) -> web.Response:
        headers = {
            "Access-Control-Allow-Methods": "POST, GET, DELETE, PATCH, OPTIONS",
            "Access-Control-Allow-Headers": allowed_request_headers(
                request.headers.get("Access-Control-Request-Headers", "")
            ),
            "Access-Control-Max-Age": "600",
            "Vary": "Access-Control-Request-Headers",
        }
        if request.path == WHIP:
            headers["Accept-Post"] = SDP  # RFC 9725 §4.1
        elif "call_id" in request.match_info and not request.path.endswith("/hangup"):
            headers["Accept-Patch"] = SDPFRAG  # RFC 5789 §3.1, RFC 9725 §4.3
        return web.Response(status=204, headers=headers)

    async def get_demo_page(request: web.Request) -> web.FileResponse:
        assert demo_page is not None
        return web.FileResponse(demo_page, headers={"Cache-Control": "no-store"})

    async def post_demo_client_secret(request: web.Request) -> web.Response:
        # The page is a development aid: it holds no key of its own, so signaling mints a
        # short-lived ek_ for it, and only for a browser on this very machine.
        ip = peer_ip(request)
        service.check_ip_rate(ip)
        if not ipaddress.ip_address(ip).is_loopback:
            raise errors.forbidden("The demo page mints client secrets for loopback peers only.")
        principal = await service.authenticate(f"Bearer {demo_api_key}")
        secret = await service.create_client_secret(principal, 0, None)
        return web.json_response({"value": secret.value, "expires_at": int(secret.expires_at)})

    if demo_page is not None:
        app.router.add_get("/", get_demo_page)
        app.router.add_post("/demo/client_secret", post_demo_client_secret)
    app.router.add_post(CALLS, post_call)
    app.router.add_get(CALLS + "/{call_id}", get_call)
    app.router.add_delete(CALLS + "/{call_id}", delete_call)
    app.router.add_patch(CALLS + "/{call_id}", patch_session)
    app.router.add_post(CALLS + "/{call_id}/hangup", hangup_call)
    app.router.add_get("/v1/realtime", sideband)
    app.router.add_post("/v1/realtime/client_secrets", post_client_secret)
    app.router.add_post(WHIP, post_whip)
    app.router.add_delete(WHIP + "/{call_id}", delete_call)
    app.router.add_patch(WHIP + "/{call_id}", patch_session)
    for path in (
        CALLS,
        CALLS + "/{call_id}",
        CALLS + "/{call_id}/hangup",
        "/v1/realtime/client_secrets",
        WHIP,
        WHIP + "/{call_id}",
    ):
        app.router.add_route("OPTIONS", path, preflight)
    return app


def allowed_request_headers(requested: str) -> str:
    """The preflight's answer: the requested headers that are allowed, as asked (a browser
    refuses the request if one it needs is missing)."""
    names = [name.strip() for name in requested.split(",") if name.strip()]
    allowed = [
        name
        for name in names
        if name.lower() in ALLOWED_HEADERS or name.lower().startswith(ALLOWED_HEADER_PREFIXES)
    ]
    return ", ".join(allowed) if names else DEFAULT_ALLOWED_HEADERS


async def _pump_sideband(
    ws: web.WebSocketResponse,
    stream: SidebandCall,
    call_id: str,
) -> None:
    """Server events to the WebSocket, client events to the transceiver, until either side
    ends; then both are closed."""

    async def to_transceiver() -> None:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await stream.write(
                    transceiver_pb2.StreamSessionEventsRequest(client_event=message.data)
                )
            elif message.type is WSMsgType.BINARY:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"text events only")
                return

    async def to_websocket() -> None:
        async for response in stream:
            await ws.send_str(response.server_event)

    loop = asyncio.get_running_loop()
    pumps = {loop.create_task(to_transceiver()), loop.create_task(to_websocket())}
    done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    reason = "closed"
    for task in done:
        error = task.exception()
        if isinstance(error, grpc.aio.AioRpcError):
            reason = error.code().name
        elif error is not None and not isinstance(error, ConnectionError):
            raise error
    stream.cancel()
    await ws.close()
    log_event(logger, "call.sideband_closed", call__id=call_id, reason=reason)


def _cors(request: web.Request, response: web.StreamResponse, origins: Sequence[str]) -> None:
    origin = request.headers.get("Origin")
    if not origin:
        return
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    else:
        return
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


def _too_large(limit: int) -> StatusError:
    return errors.bad_request(
        "request_too_large", f"Request body is larger than {limit} bytes.", http_status=413
    )


def _parse_form(content_type: str, body: bytes) -> tuple[bytes, bytes | None]:
    """multipart/form-data (RFC 7578) -> its `sdp` part and its `session` part, if any.
    Pure and synchronous: it runs in a worker thread."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise errors.bad_request("invalid_multipart", "multipart body could not be parsed.")
    parts: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = payload
    if "sdp" not in parts:
        raise errors.bad_request("missing_sdp", "multipart body has no 'sdp' part.")
    return parts["sdp"], parts.get("session")


def _session_of(text: bytes | None, max_depth: int) -> Any:
    if text is None:
        return None
    session = parse_json(text, max_depth, "invalid_session", "'session' part")
    if not isinstance(session, dict):
        raise errors.bad_request("invalid_session", "'session' must be a JSON object.")
    return session
