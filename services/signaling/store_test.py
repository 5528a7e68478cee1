"""CallStore: both implementations against the same checks (Redis is a real redis-server on
a free loopback port), calls shared between two signaling replicas, and a store outage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import aiohttp
import pytest

from libs.service.redis_testing import free_port, redis_server
from services.signaling.signaling_testing import (
    API_KEY,
    AUTH,
    CHROME_OFFER,
    SDP,
    expect_error,
    fake_cluster,
    no_sessions,
    running_signaling,
)
from services.signaling.store import (
    CallRecord,
    CallStore,
    MemoryCallStore,
    RedisCallStore,
    SecretRecord,
    make_store,
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as redis:
        yield redis.url


def _call(call_id: str = "rtc_1") -> CallRecord:
    return CallRecord(
        call_id=call_id,
        owner="key:abc",
        cluster_id=7,
        transceiver_node_id="t-1",
        transceiver_address="127.0.0.1:1",
        session_id=call_id,
        ice_ufrag="U" * 36,
        created_at=time.time(),
    )


async def _check_store(store: CallStore) -> None:
    try:
        assert await store.get_call("rtc_1") is None
        call = _call()
        await store.put_call(call)
        await store.put_call(_call("rtc_2"))
        assert await store.get_call("rtc_1") == call
        assert [c.call_id for c in await store.live_calls_on("t-1")] == ["rtc_1", "rtc_2"]
        assert await store.live_calls_on("t-2") == []
        ended = call.ended(time.time(), 2)
        await store.put_call(ended)
        assert await store.get_call("rtc_1") == ended
        assert [c.call_id for c in await store.live_calls_on("t-1")] == ["rtc_2"]
        await store.forget_node("t-1")
        live = SecretRecord("key:abc", time.time() + 60, {"voice": "marin"})
        await store.put_secret("d1", live)
        assert await store.get_secret("d1") == live
        await store.put_secret("d2", SecretRecord("key:abc", time.time() - 1, {}))
        assert await store.get_secret("d2") is None
        assert await store.get_secret("unknown") is None
    finally:
        await store.close()


async def test_memory_store() -> None:
    await _check_store(make_store("", 60.0))


async def test_redis_store(redis_url: str) -> None:
    store = make_store(redis_url, 60.0)
    assert isinstance(store, RedisCallStore)
    await _check_store(store)


async def test_memory_store_forgets_old_calls() -> None:
    now = [1000.0]
    store = MemoryCallStore(retention_s=10.0, max_records=3, clock=lambda: now[0])
    await store.put_call(replace(_call("a"), created_at=now[0]))
    now[0] += 20
    await store.put_call(replace(_call("b"), created_at=now[0]))
    assert await store.get_call("a") is None
    assert await store.get_call("b") is not None
    for name in "cdef":
        await store.put_call(replace(_call(name), created_at=now[0]))
    assert await store.get_call("b") is None  # max_records keeps the newest 3


async def test_a_call_created_on_one_replica_ends_on_another(redis_url: str) -> None:
    async with (
        fake_cluster() as cluster,
        running_signaling(
            cluster.geosteer_address, [API_KEY], store=make_store(redis_url, 60.0)
        ) as first,
        running_signaling(
            cluster.geosteer_address, [API_KEY], store=make_store(redis_url, 60.0)
        ) as second,
        aiohttp.ClientSession() as http,
    ):
        response = await http.post(
            first.base_url + "/v1/realtime/calls", data=CHROME_OFFER, headers={**AUTH, **SDP}
        )
        assert response.status == 201
        location = response.headers["Location"]
        response = await http.delete(second.base_url + location, headers=AUTH)
        assert response.status == 204
        assert no_sessions(cluster)
        # A client secret minted on one replica works on the other.
        response = await http.post(
            first.base_url + "/v1/realtime/client_secrets", json={}, headers=AUTH
        )
        secret = (await response.json())["value"]
        response = await http.post(
            second.base_url + "/whip",
            data=CHROME_OFFER,
            headers={"Authorization": f"Bearer {secret}", **SDP},
        )
        assert response.status == 201


async def test_store_outage_closes_the_created_session() -> None:
    # A Redis URL where nothing listens: the session is created, recording it fails.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with (
        fake_cluster() as cluster,
        running_signaling(cluster.geosteer_address, [API_KEY], store=make_store(dead, 60.0)) as s,
        aiohttp.ClientSession() as http,
    ):
        response = await http.post(
            s.base_url + "/v1/realtime/calls", data=CHROME_OFFER, headers={**AUTH, **SDP}
        )
        await expect_error(response, 503, "server_error", "store_unavailable")
        assert response.headers["Retry-After"] == "2"
        assert no_sessions(cluster)
        assert len(cluster.transceivers[0].closed) == 1
