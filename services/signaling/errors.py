"""The call API's refusals: `StatusError`s in OpenAI's vocabulary (HTTP status, error type
and code), with the gRPC code signaling's own gRPC API answers for each."""

from __future__ import annotations

import grpc

from libs.service.errors import StatusError


def bad_request(code: str, message: str, *, http_status: int = 400) -> StatusError:
    return StatusError(
        grpc.StatusCode.INVALID_ARGUMENT,
        code,
        message,
        http_status=http_status,
        error_type="invalid_request_error",
    )


def call_not_active(call_id: str) -> StatusError:
    """Hangup or sideband of a call that has ended (OpenAI answers 400)."""
    return bad_request("call_not_active", f"Call '{call_id}' has already ended.")


def precondition(code: str, message: str, http_status: int) -> StatusError:
    """412 (If-Match names another ICE session) or 428 (an ICE restart without If-Match):
    RFC 9725 §4.3.1, RFC 9110 §13.1.1, RFC 6585 §3."""
    return StatusError(
        grpc.StatusCode.FAILED_PRECONDITION,
        code,
        message,
        http_status=http_status,
        error_type="invalid_request_error",
    )


def unauthorized(code: str, message: str) -> StatusError:
    return StatusError(grpc.StatusCode.UNAUTHENTICATED, code, message)


def forbidden(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.PERMISSION_DENIED, "insufficient_permissions", message)


def not_found(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.NOT_FOUND, "not_found", message)


def rate_limited(message: str, retry_after_s: int) -> StatusError:
    return StatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate_limit_exceeded",
        message,
        retry_after_s=retry_after_s,
    )


def unavailable(code: str, message: str, retry_after_s: int, *, exhausted: bool) -> StatusError:
    """503: RESOURCE_EXHAUSTED on gRPC when capacity ran out, UNAVAILABLE when a dependency
    could not be reached (signaling.proto)."""
    return StatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED if exhausted else grpc.StatusCode.UNAVAILABLE,
        code,
        message,
        http_status=503,
        retry_after_s=retry_after_s,
    )


def server_error(message: str) -> StatusError:
    """500: a bug or an unexpected failure; the message says nothing about internals."""
    return StatusError(grpc.StatusCode.INTERNAL, "server_error", message)
