"""The process lifecycle: first signal drains (NOT_SERVING, drain hook), second forces."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.service.runtime import EXIT_FORCED, EXIT_OK, GrpcService, run_until_signal


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(response.status)


async def test_first_signal_drains_second_forces() -> None:
    service = GrpcService("unit", "127.0.0.1:0", [])
    await service.start()
    draining = asyncio.Event()
    closed = asyncio.Event()

    async def drain(grace_s: float) -> None:
        assert grace_s == 60.0
        draining.set()
        await asyncio.Event().wait()  # sessions that never finish

    async def close() -> None:
        closed.set()

    runner = asyncio.create_task(
        run_until_signal(service, drain_grace_s=60.0, drain=drain, close=close)
    )
    await asyncio.sleep(0)
    assert await _health(service.address) == health_pb2.HealthCheckResponse.SERVING
    os.kill(os.getpid(), signal.SIGTERM)
    await draining.wait()
    assert await _health(service.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not runner.done()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await runner == EXIT_FORCED
    assert closed.is_set()
    await service.close()  # idempotent


async def test_drain_that_finishes_exits_zero() -> None:
    service = GrpcService("unit", "127.0.0.1:0", [])
    await service.start()
    finished = asyncio.Event()

    async def drain(grace_s: float) -> None:
        finished.set()

    runner = asyncio.create_task(run_until_signal(service, drain_grace_s=5.0, drain=drain))
    await asyncio.sleep(0)
    os.kill(os.getpid(), signal.SIGINT)
    assert await runner == EXIT_OK
    assert finished.is_set()


async def test_drain_grace_bounds_a_slow_drain() -> None:
    service = GrpcService("unit", "127.0.0.1:0", [])
    await service.start()

    async def drain(grace_s: float) -> None:
        await asyncio.Event().wait()

    runner = asyncio.create_task(run_until_signal(service, drain_grace_s=0.2, drain=drain))
    await asyncio.sleep(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await runner == EXIT_OK
