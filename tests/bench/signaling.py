"""Signaling call setup benchmark: the real signaling app (aiohttp + CallService) in this
process against in-process fake geosteer/transceiver gRPC servers on loopback.

Prints calls set up per second and p50/p99 of POST -> 201 as the client sees it, and the
per-hop p50/p99 (geosteer.route, transceiver.create_session, signaling.create_call) from
the spans captured by an in-memory exporter.

  ./bazelw run //tests/bench:signaling -- --calls 1000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.signaling.calls import CallSettings
from services.signaling.fakes import fake_cluster, running_signaling
from services.signaling.testkit import CHROME_OFFER

API_KEY = "sk-bench-0123456789abcdef"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


async def run(calls: int, concurrency: int, warmup: int) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = CallSettings(
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

        for _ in range(warmup):
            await one(False)
        exporter.clear()
        queue = iter(range(calls))

        async def worker() -> None:
            for _ in queue:
                await one(True)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed_s = time.perf_counter() - started

    hops: dict[str, list[float]] = {}
    for span in exporter.get_finished_spans():
        if span.start_time is not None and span.end_time is not None:
            hops.setdefault(span.name, []).append((span.end_time - span.start_time) / 1e6)
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
    args = parser.parse_args(argv)
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be >= 1")
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(run(args.calls, args.concurrency, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
