"""One error type for every refusal, raised anywhere and mapped once at the process edge.

A `StatusError` carries its gRPC status code, a stable machine-readable `code` (OpenAI's
error `code`, e.g. `session_not_found`) and a message for people. `StatusErrorInterceptor`
turns it into the gRPC status of any RPC it escapes from (the code travels as trailing
metadata `error-code`, with `retry-after` when set); signaling's HTTP layer renders the same
object as OpenAI's JSON error body with the HTTP status below. Nothing else needs to know
about either edge.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

ERROR_CODE_METADATA = "error-code"
RETRY_AFTER_METADATA = "retry-after"

# The HTTP status of each gRPC code, as Google's API design guide pairs them.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def openai_error_type(http_status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if http_status == 429:
        return "requests"
    if http_status >= 500:
        return "server_error"
    return "invalid_request_error"


class StatusError(Exception):
    """A refusal with its status: gRPC code, stable error code, message.

    `http_status` defaults from the gRPC code; give it where the HTTP API answers otherwise
    (a full cluster is RESOURCE_EXHAUSTED on gRPC but 503 with Retry-After over HTTP).
    """

    def __init__(
        self,
        grpc_code: grpc.StatusCode,
        code: str,
        message: str,
        *,
        http_status: int | None = None,
        error_type: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code
        self.code = code
        self.message = message
        self.http_status = (
            http_status if http_status is not None else HTTP_STATUS.get(grpc_code, 500)
        )
        self.error_type = error_type or openai_error_type(self.http_status)
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"StatusError({self.grpc_code.name}, {self.code!r}, {self.message!r})"

    def body(self) -> dict[str, Any]:
        """OpenAI's JSON error body."""
        return {
            "error": {
                "type": self.error_type,
                "code": self.code,
                "message": self.message,
                "param": None,
            }
        }

    def http_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Ends the RPC with this status (raises, as `context.abort` does)."""
        trailers: tuple[tuple[str, str], ...] = ((ERROR_CODE_METADATA, self.code),)
        if self.retry_after_s is not None:
            trailers += ((RETRY_AFTER_METADATA, str(self.retry_after_s)),)
        await context.abort(self.grpc_code, self.message, trailing_metadata=trailers)


def invalid_argument(code: str, message: str) -> StatusError:
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, code, message)


def not_found(code: str, message: str) -> StatusError:
    return StatusError(grpc.StatusCode.NOT_FOUND, code, message)


def resource_exhausted(code: str, message: str) -> StatusError:
    return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, code, message)


def failed_precondition(code: str, message: str) -> StatusError:
    return StatusError(grpc.StatusCode.FAILED_PRECONDITION, code, message)


Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


def _unary(behavior: Handler) -> Handler:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except StatusError as exc:
            await exc.abort(context)

    return handle


def _streaming(behavior: Handler) -> Handler:
    if not inspect.isasyncgenfunction(behavior):
        return _unary(behavior)  # a handler that writes with context.write()

    async def handle(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except StatusError as exc:
            await exc.abort(context)

    return handle


class StatusErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps a `StatusError` escaping any handler to its gRPC status; every server has it."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), **codecs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream), **codecs)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(handler.stream_stream), **codecs
            )
        return handler


def error_code_of(error: grpc.aio.AioRpcError) -> str:
    """The `StatusError.code` a server sent with a failed call; empty if none."""
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == ERROR_CODE_METADATA:
            return str(value)
    return ""
