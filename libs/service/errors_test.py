"""StatusError over a real gRPC server: every handler shape ends with the error's status."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from libs.service.errors import (
    StatusError,
    error_code_of,
    invalid_argument,
    not_found,
    resource_exhausted,
)
from libs.service.runtime import GrpcService, Servicer

SERVICE = "voiceedge.test.v1.ErrorService"


def _identity(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, context: Any) -> bytes:
    if request == b"ok":
        return b"fine"
    raise not_found("session_not_found", f"no session {request.decode()!r}")


async def _server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    raise resource_exhausted("capacity", "transceiver is full")


async def _writer(request: bytes, context: Any) -> None:
    await context.write(b"first")
    raise invalid_argument("bad_offer", "offer has no audio")


async def _bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"stop":
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "stopped", "asked to stop")
        yield request


async def _crash(request: bytes, context: Any) -> bytes:
    raise RuntimeError("a bug, not a refusal")


def _add(implementation: object, server: grpc.aio.Server) -> None:
    kinds = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, _identity, _identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, _identity, _identity),
        "Writer": grpc.unary_stream_rpc_method_handler(_writer, _identity, _identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, _identity, _identity),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, kinds),))


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[grpc.aio.Channel]:
    service = GrpcService("errors", "127.0.0.1:0", [Servicer(SERVICE, _add, object())])
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            yield channel
    finally:
        await service.close()


def _call(channel: grpc.aio.Channel, kind: str, method: str) -> Any:
    factory = getattr(channel, kind)
    return factory(
        f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=_identity
    )


async def test_unary_refusal_and_success() -> None:
    async with _serving() as channel:
        await _unary_refusal_and_success(channel)


async def _unary_refusal_and_success(channel: grpc.aio.Channel) -> None:
    assert await _call(channel, "unary_unary", "Unary")(b"ok", timeout=5) == b"fine"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "unary_unary", "Unary")(b"s1", timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no session 's1'"
    assert error_code_of(caught.value) == "session_not_found"


@pytest.mark.parametrize(
    ("method", "status", "code"),
    [
        ("ServerStream", grpc.StatusCode.RESOURCE_EXHAUSTED, "capacity"),
        ("Writer", grpc.StatusCode.INVALID_ARGUMENT, "bad_offer"),
    ],
)
async def test_streams_send_what_came_before_then_the_status(
    method: str, status: grpc.StatusCode, code: str
) -> None:
    async with _serving() as channel:
        call = _call(channel, "unary_stream", method)(b"", timeout=5)
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == status
    assert error_code_of(caught.value) == code


async def test_bidi_refusal() -> None:
    async with _serving() as channel:
        call = _call(channel, "stream_stream", "Bidi")(timeout=5)
        await call.write(b"a")
        assert await call.read() == b"a"
        await call.write(b"stop")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_code_of(caught.value) == "stopped"


async def test_a_bug_stays_unknown_with_no_error_code() -> None:
    async with _serving() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call(channel, "unary_unary", "Crash")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert error_code_of(caught.value) == ""


@pytest.mark.parametrize(
    ("error", "http_status", "error_type"),
    [
        (invalid_argument("x", "m"), 400, "invalid_request_error"),
        (not_found("x", "m"), 404, "invalid_request_error"),
        (resource_exhausted("x", "m"), 429, "requests"),
        (StatusError(grpc.StatusCode.UNAVAILABLE, "x", "m", retry_after_s=2), 503, "server_error"),
        (
            StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", "m", http_status=503),
            503,
            "server_error",
        ),
        (StatusError(grpc.StatusCode.INTERNAL, "x", "m"), 500, "server_error"),
    ],
)
def test_http_mapping(error: StatusError, http_status: int, error_type: str) -> None:
    assert error.http_status == http_status
    assert error.body() == {
        "error": {"type": error_type, "code": "x", "message": "m", "param": None}
    }


def test_retry_after_is_a_header() -> None:
    error = StatusError(grpc.StatusCode.UNAVAILABLE, "x", "m", retry_after_s=2, headers={"A": "b"})
    assert error.http_headers() == {"A": "b", "Retry-After": "2"}
