"""Errors of the call API, in OpenAI's JSON shape, with their gRPC mirror codes."""

from __future__ import annotations

from typing import Any

import grpc


class ApiError(Exception):
    """A refusal both front ends render: HTTP status + {"error": {...}}, or a gRPC status."""

    def __init__(
        self,
        status: int,
        error_type: str,
        code: str,
        message: str,
        *,
        grpc_code: grpc.StatusCode,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.message = message
        self.grpc_code = grpc_code
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "type": self.error_type,
                "code": self.code,
                "message": self.message,
                "param": None,
            }
        }


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(
        400, "invalid_request_error", code, message, grpc_code=grpc.StatusCode.INVALID_ARGUMENT
    )


def call_not_active(call_id: str) -> ApiError:
    """Hangup or sideband of a call that has ended (OpenAI answers 400)."""
    return bad_request("call_not_active", f"Call '{call_id}' has already ended.")


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(
        401, "invalid_request_error", code, message, grpc_code=grpc.StatusCode.UNAUTHENTICATED
    )


def forbidden(message: str) -> ApiError:
    return ApiError(
        403,
        "invalid_request_error",
        "insufficient_permissions",
        message,
        grpc_code=grpc.StatusCode.PERMISSION_DENIED,
    )


def not_found(message: str) -> ApiError:
    return ApiError(
        404, "invalid_request_error", "not_found", message, grpc_code=grpc.StatusCode.NOT_FOUND
    )


def rate_limited(message: str, retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        "requests",
        "rate_limit_exceeded",
        message,
        grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        retry_after_s=retry_after_s,
    )


def unavailable(code: str, message: str, retry_after_s: int, *, exhausted: bool) -> ApiError:
    """503: RESOURCE_EXHAUSTED on gRPC when capacity ran out, UNAVAILABLE when a dependency
    could not be reached (signaling.proto)."""
    return ApiError(
        503,
        "server_error",
        code,
        message,
        grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED if exhausted else grpc.StatusCode.UNAVAILABLE,
        retry_after_s=retry_after_s,
    )
