"""The Redis binding copy with a real redis-server: a fresh relay carries an established
call on from Redis, and Redis going down only costs counted errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
import redis.asyncio as aioredis

from libs.service.aio import cancel_and_wait
from libs.service.redis_testing import redis_server
from libs.wire import framing
from services.relay.relay_testing import (
    KEYS,
    address_of,
    data_plane,
    free_udp_port,
    recv,
    recv_until_quiet,
    udp_socket,
)
from services.relay.router import binding_request_for
from services.relay.settings import RelaySettings
from services.relay.store import TOPOLOGY_KEY, RedisBindingStore, binding_key, parse_value
from services.relay.workers import make_worker

SRTP = bytes([0x80, 0x6F]) + bytes(100)


def _name(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


async def _send_until_forwarded(
    client: socket.socket, vip: tuple[str, int], transceiver: socket.socket, attempts: int = 50
) -> bytes:
    """SRTP every 50 ms until the transceiver gets one (the first may be dropped while the
    relay asks Redis)."""
    for _ in range(attempts):
        client.sendto(SRTP, vip)
        with contextlib.suppress(TimeoutError):
            return (await recv(transceiver, 0.05))[0]
    raise AssertionError("no packet was forwarded")


def test_parse_value() -> None:
    assert parse_value(b"1/2") == (1, 2)
    assert parse_value("7/42") == (7, 42)
    assert parse_value(b"garbage") is None
    assert parse_value(b"a/b") is None


async def test_a_fresh_relay_restores_the_binding_from_redis() -> None:
    with redis_server() as redis, contextlib.ExitStack() as stack:
        transceiver, client = (stack.enter_context(udp_socket()) for _ in range(2))
        media = _name(transceiver)
        topology = [f"1/1={media[0]}:{media[1]}"]
        store = RedisBindingStore(redis.url, ttl_s=30, timeout_s=1)
        try:
            async with data_plane(topology, store) as first:
                request, _ = binding_request_for(KEYS, 1, 1)
                client.sendto(request, address_of(first.public_addresses[0]))
                await recv(transceiver)
                await first.flush_writes()
                assert store.writes == 1
            async with aioredis.Redis.from_url(redis.url) as check:
                assert await check.get(binding_key(_name(client))) == b"1/1"
                assert 0 < await check.pttl(binding_key(_name(client))) <= 30_000
            async with data_plane(topology, store) as second:
                frame = await _send_until_forwarded(
                    client, address_of(second.public_addresses[0]), transceiver
                )
                assert frame == framing.encode(*_name(client), SRTP)
                assert store.hits == 1
                # An address Redis does not know stays unbound.
                stranger = stack.enter_context(udp_socket())
                stranger.sendto(SRTP, address_of(second.public_addresses[0]))
                # Routed in arrival order: once the bound client's packet is through, the
                # stranger's lookup has started.
                client.sendto(SRTP, address_of(second.public_addresses[0]))
                await recv(transceiver)
                await second.flush_lookups()
                assert store.misses == 1
                assert second.router.get(_name(stranger)) is None
        finally:
            await store.close()


async def test_redis_down_keeps_forwarding_and_recovers() -> None:
    with redis_server() as redis, contextlib.ExitStack() as stack:
        transceiver, client, late = (stack.enter_context(udp_socket()) for _ in range(3))
        media = _name(transceiver)
        store = RedisBindingStore(redis.url, ttl_s=30, timeout_s=0.5)
        try:
            async with data_plane([f"1/1={media[0]}:{media[1]}"], store) as plane:
                vip = address_of(plane.public_addresses[0])
                client.sendto(binding_request_for(KEYS, 1, 1)[0], vip)
                await recv(transceiver)
                await plane.flush_writes()
                redis.stop()
                for _ in range(5):
                    client.sendto(SRTP, vip)
                assert len(await recv_until_quiet(transceiver, 0.3)) == 5
                late.sendto(binding_request_for(KEYS, 1, 1)[0], vip)
                await recv(transceiver)
                await plane.flush_writes()
                assert store.errors >= 1
                writes = store.writes
                redis.start()
                # The binding made while Redis was down is rewritten by the next refresh.
                await plane.refresh_now()
                assert store.writes > writes
                async with aioredis.Redis.from_url(redis.url) as check:
                    assert await check.get(binding_key(_name(late))) == b"1/1"
        finally:
            await store.close()


async def test_scan_and_topology_copy_round_trip() -> None:
    with redis_server() as redis:
        store = RedisBindingStore(redis.url, ttl_s=30, timeout_s=1)
        try:
            assert await store.scan(10, time.monotonic() + 10) == []
            assert await store.load_topology() is None
            await store.put(("203.0.113.9", 5000), 1, 2)
            await store.put(("2001:db8::9", 5001), 3, 4)
            async with aioredis.Redis.from_url(redis.url) as raw:
                await raw.set(binding_key(("203.0.113.10", 1)), b"garbage")
                await raw.set("voiceedge:relay:binding:not-an-ip:1", b"1/1")
            found = sorted(await store.scan(10, time.monotonic() + 10))
            assert found == [(("2001:db8::9", 5001), 3, 4), (("203.0.113.9", 5000), 1, 2)]
            assert len(await store.scan(1, time.monotonic() + 10)) == 1
            assert await store.save_topology('{"v": 1}')
            assert await store.load_topology() == '{"v": 1}'
            async with aioredis.Redis.from_url(redis.url) as raw:
                assert 0 < await raw.ttl(TOPOLOGY_KEY) <= 86_400  # no key left forever
        finally:
            await store.close()


def _settings(**overrides: object) -> RelaySettings:
    base: dict[str, object] = {
        "udp_listen": ("127.0.0.1:0",),
        "internal_listen": "127.0.0.1:0",
        "tcp_listen": "",
        "workers": 1,
        "preload_timeout_s": 2.0,
        "recall_bindings": False,  # its hellos would reach the fake transceiver (recall_test)
    }
    return RelaySettings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.mark.allow_leaked_tasks(
    reason="grpc.aio ends a cancelled call to the dead geosteer a few loop passes after its "
    "channel closed, after the plugin's three-pass check"
)
async def test_a_relay_started_while_geosteer_is_down_forwards_the_first_packet() -> None:
    """The first relay routes on a topology and persists it with its bindings; a second one,
    whose geosteer is down and which has no static entry, forwards the call's very first
    SRTP packet (no drop while it would ask Redis: the binding was installed at start)."""
    with redis_server() as redis, contextlib.ExitStack() as stack:
        transceiver, client = (stack.enter_context(udp_socket()) for _ in range(2))
        media = _name(transceiver)
        first = _settings(redis_url=redis.url, transceivers=(f"1/1={media[0]}:{media[1]}",))
        plane, store, watch = await make_worker(first, 0)
        try:
            client.sendto(binding_request_for(KEYS, 1, 1)[0], address_of(plane.public_addresses[0]))
            await recv(transceiver)
            await plane.flush_writes()
            async with aioredis.Redis.from_url(redis.url) as raw:
                for _ in range(100):  # bounded: the tick saves the topology within ~1 s
                    if await raw.get(TOPOLOGY_KEY):
                        break
                    await asyncio.sleep(0.05)
                assert await raw.get(TOPOLOGY_KEY)
        finally:
            await cancel_and_wait(watch)
            await plane.close()
            await store.close()
        dead_geosteer = f"127.0.0.1:{free_udp_port()}"
        second = _settings(redis_url=redis.url, geosteer_address=dead_geosteer)
        plane, store, watch = await make_worker(second, 0)
        try:
            assert plane.router.topology.transceivers == {(1, 1): media}
            assert plane.router.get(_name(client)) is not None  # preloaded
            client.sendto(SRTP, address_of(plane.public_addresses[0]))
            assert (await recv(transceiver))[0] == framing.encode(*_name(client), SRTP)
            assert plane.router.counters().packets_dropped == 0
        finally:
            await cancel_and_wait(watch)
            await plane.close()
            await store.close()
