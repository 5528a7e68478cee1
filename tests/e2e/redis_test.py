"""The edge on Redis (what it runs on in Kubernetes): calls in a row leave no sessions and
no bindings behind, and nothing in Redis without an expiry.

A real redis-server on a free loopback port; relay and signaling both use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from examples.python_client.client import run_call
from libs.service.redis_testing import redis_server
from tools.demo.stack import Stack, StackConfig, start_stack
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

API_KEY = "sk-e2e-redis-0123456789"
BINDING_PREFIX = "voiceedge:relay:binding:"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    with (workdir / "services.log").open("w") as log:
        running = start_stack(
            StackConfig(
                relay_udp_port=0,
                http_port=0,
                api_key=API_KEY,
                redis_url=redis_url,
                workdir=workdir,
                log=log,
                extra_flags={
                    "relay": ["--idle-timeout-s", "2", "--binding-ttl-s", "2"],
                    "signaling": ["--call-retention-s", "60"],
                },
            )
        )
        try:
            yield running
        finally:
            running.stop()


def _active_sessions(stack: Stack) -> int:
    with grpc.insecure_channel(stack.grpc("transceiver")) as channel:
        stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)
        sessions = stub.ListSessions(transceiver_pb2.ListSessionsRequest(), timeout=5).sessions
    return sum(1 for s in sessions if s.state != transceiver_pb2.SESSION_STATE_CLOSED)


async def _wait_for(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout_s(120)
async def test_calls_in_a_row_leave_nothing_behind_in_redis(stack: Stack, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for _ in range(3):
            result = await run_call(stack.http_base, API_KEY, seconds=0.3)
            assert result.connected
        # While calls ran, the relay wrote its bindings and signaling its call records.
        keys = [str(k) for k in client.keys("*")]
        assert any(k.startswith("voiceedge:") and "call" in k for k in keys), keys
        await _wait_for("no active sessions", lambda: _active_sessions(stack) == 0, 15)
        await _wait_for(
            "relay binding keys to expire",
            lambda: not client.keys(BINDING_PREFIX + "*"),
            15,
        )
        # What remains (ended call records) expires on its own: no key without a TTL.
        persistent = [k for k in client.keys("*") if client.pttl(k) < 0]
        assert persistent == []
    finally:
        client.close()
    assert stack.check_alive() is None
