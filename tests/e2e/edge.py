"""Shared by the end-to-end tests: the edge as processes, and what to ask it afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from tools.demo.stack import Stack, StackConfig, start_stack
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection


@contextlib.contextmanager
def edge(
    workdir: Path,
    api_key: str,
    *,
    redis_url: str = "",
    extra_flags: dict[str, list[str]] | None = None,
    metrics: bool = False,
    geosteer_replicas: int = 1,
) -> Iterator[Stack]:
    """Every service on free loopback ports (with `metrics`, /metrics too: Stack.metrics;
    several geosteer replicas share `redis_url`'s registry); their logs go to
    workdir/services.log."""
    with (workdir / "services.log").open("w") as log:
        running = start_stack(
            StackConfig(
                relay_udp_port=0,
                http_port=0,
                api_key=api_key,
                redis_url=redis_url,
                workdir=workdir,
                log=log,
                extra_flags=extra_flags or {},
                metrics_ports={} if metrics else None,
                geosteer_replicas=geosteer_replicas,
            )
        )
        try:
            yield running
        finally:
            running.stop()


def active_sessions(stack: Stack) -> int:
    """Sessions the transceiver has not closed yet."""
    with grpc.insecure_channel(stack.grpc("transceiver")) as channel:
        stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)
        sessions = stub.ListSessions(transceiver_pb2.ListSessionsRequest(), timeout=5).sessions
    return sum(1 for s in sessions if s.state != transceiver_pb2.SESSION_STATE_CLOSED)


async def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    """Polls a blocking check (a gRPC or Redis query: nothing to await) until true, bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def caller_closed(pc: RTCPeerConnection, timeout_s: float) -> bool:
    """Waits (bounded) for the caller's connection to be closed or failed."""
    deadline = time.monotonic() + timeout_s
    while pc.connectionState not in ("closed", "failed"):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
