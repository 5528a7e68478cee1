"""The edge on Redis (what it runs on in Kubernetes): calls in a row leave no sessions and
no bindings behind, and nothing in Redis without an expiry.

A real redis-server on a free loopback port; relay and signaling both use it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from examples.python_client.client import run_call
from libs.service.redis_testing import redis_server
from tests.e2e.edge import active_sessions, edge, wait_for
from tools.demo.stack import Stack

API_KEY = "sk-e2e-redis-0123456789"
BINDING_PREFIX = "voiceedge:relay:binding:"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    flags = {
        "relay": ["--idle-timeout-s", "2", "--binding-ttl-s", "2"],
        "signaling": ["--call-retention-s", "60"],
    }
    workdir = tmp_path_factory.mktemp("stack")
    with edge(workdir, API_KEY, redis_url=redis_url, extra_flags=flags) as running:
        yield running


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
        await wait_for("no active sessions", lambda: active_sessions(stack) == 0, 15)
        await wait_for(
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
