"""Signaling call setup benchmark.

Default mode: the real signaling app (aiohttp + CallService) in this process against
in-process fake geosteer/transceiver gRPC servers on loopback: signaling's own overhead.
`--stack` mode: the whole edge as processes (tools/demo/stack: real geosteer, real aiortc
transceiver answering each offer, relay, bridge, signaling), with signaling exporting its
spans over OTLP to a receiver in this process; each call is DELETEd after its 201 (untimed)
so transceiver sessions do not pile up.

Prints calls set up per second and p50/p99 of POST -> 201 as the client sees it, and the
per-hop p50/p99 (geosteer.route, transceiver.create_session, signaling.create_call) from
the spans.

  ./bazelw run //tests/bench:signaling -- --calls 1000 --concurrency 8
  ./bazelw run //tests/bench:signaling -- --stack --calls 200 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import grpc
import grpc.aio
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.signaling.settings import SignalingSettings
from services.signaling.signaling_testing import CHROME_OFFER, fake_cluster, running_signaling
from tools.demo.stack import StackConfig, start_stack

API_KEY = "sk-bench-0123456789abcdef"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


async def drive(
    one: Callable[[bool], Awaitable[None]],
    warmup: int,
    calls: int,
    concurrency: int,
    after_warmup: Callable[[], None] | None = None,
) -> float:
    """`warmup` unrecorded calls, then `calls` recorded ones from `concurrency` workers;
    the seconds the recorded ones took."""
    for _ in range(warmup):
        await one(False)
    if after_warmup is not None:
        after_warmup()
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            await one(True)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run(calls: int, concurrency: int, warmup: int) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = SignalingSettings(
        rate_per_key_per_s=1e9, burst_per_key=10**9, rate_per_ip_per_s=1e9, burst_per_ip=10**9
    )
    async with (
        fake_cluster(transceivers=2) as cluster,
        running_signaling(
            cluster.geosteer_address,
            [API_KEY],
            settings=settings,
            tracer=provider.get_tracer("bench"),
        ) as signaling,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http,
    ):
        url = signaling.base_url + "/v1/realtime/calls"
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/sdp"}
        latencies_ms: list[float] = []

        async def one(record: bool) -> None:
            started = time.perf_counter()
            async with http.post(url, data=CHROME_OFFER, headers=headers) as response:
                await response.read()
                if response.status != 201:
                    raise RuntimeError(f"status {response.status}: {await response.text()}")
            if record:
                latencies_ms.append((time.perf_counter() - started) * 1000.0)

        elapsed_s = await drive(one, warmup, calls, concurrency, after_warmup=exporter.clear)

    hops: dict[str, list[float]] = {}
    for span in exporter.get_finished_spans():
        if span.start_time is not None and span.end_time is not None:
            hops.setdefault(span.name, []).append((span.end_time - span.start_time) / 1e6)
    _report(calls, concurrency, elapsed_s, latencies_ms, hops)


class _TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace receiver: keeps (span name, duration ms)."""

    def __init__(self) -> None:
        self.hops: dict[str, list[float]] = {}

    async def Export(  # noqa: N802 (gRPC method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    duration_ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
                    self.hops.setdefault(span.name, []).append(duration_ms)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Accepts (and ignores) the OTLP metrics signaling also exports."""

    async def Export(  # noqa: N802 (gRPC method name)
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: object
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def run_stack(calls: int, concurrency: int, warmup: int) -> None:
    receiver = _TraceReceiver()
    server = grpc.aio.server()
    # opentelemetry-proto ships no type hints for its generated gRPC modules.
    add_trace = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
    add_metrics = metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server
    add_trace(receiver, server)  # type: ignore[no-untyped-call]
    add_metrics(_MetricsReceiver(), server)  # type: ignore[no-untyped-call]
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = StackConfig(
        relay_udp_port=0,
        http_port=0,
        api_key=API_KEY,
        log=io.StringIO(),  # service logs are not part of the figures
        extra_flags={
            "signaling": [
                "--otlp-endpoint",
                f"127.0.0.1:{otlp_port}",
                "--rate-per-key-per-s",
                "1000000",
                "--burst-per-key",
                "1000000",
                "--rate-per-ip-per-s",
                "1000000",
                "--burst-per-ip",
                "1000000",
            ]
        },
    )
    stack = await asyncio.to_thread(start_stack, config)
    latencies_ms: list[float] = []
    try:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/sdp"}
        async with aiohttp.ClientSession() as http:

            async def one(record: bool) -> None:
                started = time.perf_counter()
                async with http.post(
                    stack.http_base + "/v1/realtime/calls", data=CHROME_OFFER, headers=headers
                ) as response:
                    body = await response.text()
                    if response.status != 201:
                        raise RuntimeError(f"status {response.status}: {body}")
                    location = response.headers["Location"]
                if record:
                    latencies_ms.append((time.perf_counter() - started) * 1000.0)
                async with http.delete(stack.http_base + location, headers=headers) as response:
                    await response.read()

            elapsed_s = await drive(one, warmup, calls, concurrency)
    finally:
        await asyncio.to_thread(stack.stop)  # signaling flushes its spans on SIGTERM
        await server.stop(1.0)
    # Warm-up spans came first; keep the last `calls` of each hop.
    hops = {name: values[-calls:] for name, values in receiver.hops.items()}
    _report(calls, concurrency, elapsed_s, latencies_ms, hops)


def _report(
    calls: int,
    concurrency: int,
    elapsed_s: float,
    latencies_ms: list[float],
    hops: dict[str, list[float]],
) -> None:
    print(f"calls={calls} concurrency={concurrency} elapsed_s={elapsed_s:.2f}")
    print(f"calls_per_s={calls / elapsed_s:.0f}")
    print(
        f"post_to_201_ms p50={percentile(latencies_ms, 50):.2f} "
        f"p99={percentile(latencies_ms, 99):.2f} mean={statistics.fmean(latencies_ms):.2f}"
    )
    for name in ("signaling.create_call", "geosteer.route", "transceiver.create_session"):
        values = hops.get(name, [])
        print(
            f"span {name} n={len(values)} p50_ms={percentile(values, 50):.2f} "
            f"p99_ms={percentile(values, 99):.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--stack", action="store_true", help="against the real edge processes (see above)"
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be >= 1")
    if args.uvloop:
        import uvloop

        uvloop.install()
    if args.stack:
        asyncio.run(run_stack(args.calls, args.concurrency, args.warmup))
    else:
        asyncio.run(run(args.calls, args.concurrency, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
