"""Hostile HTTP input over real TCP: every error in OpenAI's JSON shape, bounded parsing,
header and body deadlines, a per-IP connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import urlsplit

import pytest

from services.signaling.settings import SignalingSettings
from services.signaling.signaling_testing import (
    API_KEY,
    AUTH,
    CHROME_OFFER,
    env,
    expect_error,
)

DEEP = b"[" * 100_000 + b"]" * 100_000


async def _raw(base_url: str, request: bytes, *, read_timeout_s: float = 10.0) -> bytes:
    """Sends `request` bytes on a fresh connection; everything the server answers, to EOF."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(read_timeout_s):
            return await reader.read(1 << 20)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _json_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    payload = json.loads(body)
    assert set(payload) == {"error"}
    error = payload["error"]
    assert isinstance(error, dict)
    assert error["message"]
    return status, error


async def test_deeply_nested_client_secret_json_is_a_400() -> None:
    async with env(SignalingSettings(max_body_bytes=1 << 20)) as e:
        nested_40: object = 1
        for _ in range(40):
            nested_40 = [nested_40]
        too_deep = json.dumps({"session": {"a": nested_40}}).encode()
        for body in (DEEP, too_deep):
            response = await e.http.post(
                e.url("/v1/realtime/client_secrets"),
                data=body,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            error = await expect_error(response, 400, "invalid_request_error", "invalid_json")
            assert "JSON" in str(error["message"]) or "deeper" in str(error["message"])


@pytest.mark.parametrize("session", [DEEP, b'{"a":' * 40 + b"1" + b"}" * 40])
async def test_deeply_nested_multipart_session_is_a_400(session: bytes) -> None:
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="sdp"\r\n\r\n{CHROME_OFFER}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="session"\r\n\r\n'
        ).encode()
        + session
        + f"\r\n--{boundary}--\r\n".encode()
    )
    settings = SignalingSettings(max_body_bytes=1 << 20)
    async with env(settings) as e:
        response = await e.http.post(
            e.url("/v1/realtime/calls"),
            data=body,
            headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        await expect_error(response, 400, "invalid_request_error", "invalid_session")


async def test_undecodable_authorization_is_a_401() -> None:
    async with env() as e:
        raw = await _raw(
            e.signaling.base_url,
            b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer sk-\xff\xfe\xc3(\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: 4\r\nConnection: close\r\n\r\nv=0\n",
        )
        status, error = _json_error(raw)
        assert status == 401
        assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"X-Big: " + b"a" * 100_000 + b"\r\n", 400),
        (b"".join(b"X-H%d: v\r\n" % i for i in range(5000)), 400),
        (b"Content-Length: twelve\r\n", 400),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    ],
    ids=["100KiB-header", "5000-headers", "bad-content-length", "two-content-lengths"],
)
async def test_parser_errors_are_json(head: bytes, status: int) -> None:
    async with env() as e:
        raw = await _raw(
            e.signaling.base_url,
            b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n",
        )
        got, error = _json_error(raw)
        assert got == status
        assert error["type"] == "invalid_request_error"


async def test_a_client_dribbling_its_headers_is_cut_off() -> None:
    settings = SignalingSettings(header_timeout_s=0.5)
    async with env(settings) as e:
        parts = urlsplit(e.signaling.base_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                # The head never completes: the server closes (EOF), it does not wait.
                assert await reader.read(4096) == b""
        finally:
            writer.close()
        # A well-behaved client still gets through.
        response = await e.post_offer()
        assert response.status == 201


async def test_a_slow_body_gets_a_408() -> None:
    settings = SignalingSettings(body_timeout_s=0.3)
    async with env(settings) as e:
        parts = urlsplit(e.signaling.base_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(
                b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {API_KEY}\r\n".encode()
                + b"Content-Type: application/sdp\r\nContent-Length: 2000\r\n\r\nv=0\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(10):
                raw = await reader.read()  # the answer, then EOF: the server closed
        finally:
            writer.close()
        status, error = _json_error(raw)
        assert status == 408
        assert error["code"] == "request_timeout"


async def test_connections_per_ip_are_capped() -> None:
    settings = SignalingSettings(max_connections_per_ip=2, header_timeout_s=30)
    async with env(settings) as e:
        parts = urlsplit(e.signaling.base_url)
        held = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(2)]
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            try:
                writer.write(b"GET /v1/realtime/calls/x HTTP/1.1\r\nHost: x\r\n\r\n")
                async with asyncio.timeout(10):
                    # Refused: closed before any answer (EOF, or a reset by the abort).
                    with contextlib.suppress(ConnectionResetError):
                        assert await reader.read(4096) == b""
            finally:
                writer.close()
        finally:
            for _, held_writer in held:
                held_writer.close()
                await held_writer.wait_closed()
        # Once they are gone, this address may connect again.
        async with asyncio.timeout(10):
            while True:
                response = await e.post_offer()
                if response.status == 201:
                    break
                await asyncio.sleep(0.05)  # the server sees the closes a moment later
