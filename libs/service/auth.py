"""The internal gRPC plane's shared token: servers refuse calls without it, clients send it.

Every voiceedge process reads the token from `VOICEEDGE_INTERNAL_TOKEN` (the manifests set it
from a Secret; the dev demo leaves it unset, and the plane is open, as on one machine).
Servers answer UNAUTHENTICATED to any call that does not carry `authorization: Bearer
<token>`, except grpc.health.v1 (kubelet probes and the image HEALTHCHECK carry no token and
learn nothing but SERVING). Clients made with `internal_channel` add the header to every call.

The token's rules (at least 32 characters, no whitespace, no obvious placeholder) are in
libs/service/tokens.py, which imports no gRPC, so a process can check it before anything else.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from libs.observability.telemetry import log_event
from libs.service.tokens import TokenError, token_from_env

logger = logging.getLogger("voiceedge.service.auth")

# Probes carry no credentials; health reveals only SERVING / NOT_SERVING.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


# The stubs make these generic; at run time they are plain classes.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _refusing(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)


class TokenServerInterceptor(_ServerInterceptor):
    """Lets a call through only with the right bearer token (constant-time comparison)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise TokenError("a token interceptor needs a token")
        self._expected = _bearer(token).encode()
        self.refused = 0

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                given = value
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        self.refused += 1
        log_event(
            logger,
            "auth.refused",
            level=logging.WARNING,
            rpc__method=method,
            reason="missing" if not given else "wrong",
        )
        return _refusing(handler)


class _WithToken:
    """Adds the bearer token to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", _bearer(token))

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files each interceptor under the first of the four kinds it is an instance of
# (an if/elif chain), so each kind needs its own object.
class _UnaryUnary(_WithToken, _UnaryUnaryBase):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_WithToken, _UnaryStreamBase):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_WithToken, _StreamUnaryBase):
    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_WithToken, _StreamStreamBase):
    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def internal_channel(
    address: str,
    options: Sequence[tuple[str, Any]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> grpc.aio.Channel:
    """A channel to another voiceedge service, carrying the process's internal token (if any).

    The token is the process's configuration, read where the channel is made, as a
    TLS client would read its certificate: no settings object has to carry a secret."""
    token = token_from_env(environ)
    if not token:
        return grpc.aio.insecure_channel(address, options=options)
    interceptors: list[Any] = [_UnaryUnary(token), _UnaryStream(token)]
    interceptors += [_StreamUnary(token), _StreamStream(token)]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
