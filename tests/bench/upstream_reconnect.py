"""Realtime upstream sockets that end during a call (issue 17): what the caller hears.

A real bridge (gRPC on 127.0.0.1:0, backend realtime) in front of a local Realtime endpoint
that talks without pause (`services/bridge/realtime_testing.TalkingRealtime`: 1 s answers
streamed in real time, the next one asked for as soon as one is done) and ends each
connection at a limit. Three calls, one after the other:

- reference: no limit (what the pacing alone gives);
- close: each socket closed `--limit-s` after it opened (odd ones with OpenAI's
  session_expired error first, even ones bare);
- go-away: the same, with a go-away event `--goaway-ahead-s` before the close.

For each it prints every heard gap (silence a playout that plays each 20 ms frame on arrival
would have) with its time into the call, the largest, the reconnects by cause, and whether a
response came twice. BENCHMARKS.md has the figures.

    ./bazelw run //tests/bench:upstream_reconnect                       # 5 min, 60 s / 10 s
    ./bazelw run //tests/bench:upstream_reconnect -- --seconds 12 --limit-s 2 --goaway-ahead-s 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from libs.observability.metrics import BRIDGE_UPSTREAM_RECONNECTS
from services.bridge.bridge_testing import serve
from services.bridge.realtime_testing import (
    GOAWAY_EVENT,
    CallReport,
    TalkingRealtime,
    run_call,
    talking_realtime,
)
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings

READER = InMemoryMetricReader()


def reconnects() -> dict[str, int]:
    data = READER.get_metrics_data()
    found: dict[str, int] = {}
    for resource in data.resource_metrics if data is not None else []:
        for scoped in resource.scope_metrics:
            for metric in scoped.metrics:
                if metric.name == BRIDGE_UPSTREAM_RECONNECTS.name:
                    for point in metric.data.data_points:
                        cause = str((point.attributes or {}).get("cause"))
                        found[cause] = int(point.value)  # type: ignore[union-attr]
    return found


async def one_call(name: str, fake: TalkingRealtime, seconds: float) -> CallReport:
    before = reconnects()
    async with talking_realtime(fake) as url:
        settings = BridgeSettings(
            backend="realtime", realtime_url=url, realtime_goaway_event=GOAWAY_EVENT
        )
        async with serve(BridgeServicer(settings)) as stub:
            report = await run_call(stub, seconds)
    after = reconnects()
    counted = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    duplicated = len(report.started) != len(set(report.started)) or len(report.done) != len(
        set(report.done)
    )
    print(f"\n== {name}: {seconds:g} s call, {fake.connections} upstream sockets")
    for at, ms in report.gaps:
        print(f"  gap at {at:8.3f} s: {ms:6.1f} ms")
    print(
        f"  frames {report.frames}, heard gaps {len(report.gaps)}, largest "
        f"{report.max_gap_ms:.1f} ms; responses {len(report.started)} started, "
        f"{len(report.done)} done ({report.cancelled} cut by a close); duplicated: "
        f"{'yes' if duplicated else 'no'}; error events {len(report.errors)}; "
        f"ended early: {'yes' if report.end is not None else 'no'}"
    )
    print(f"  voiceedge_bridge_upstream_reconnects_total by cause: {counted or '{}'}")
    return report


async def run(args: argparse.Namespace) -> int:
    reports = [
        await one_call(
            "reference (no limit)", TalkingRealtime(limit_s=1e9), args.reference_seconds
        ),
        await one_call(
            f"close every {args.limit_s:g} s", TalkingRealtime(limit_s=args.limit_s), args.seconds
        ),
        await one_call(
            f"go-away {args.goaway_ahead_s:g} s ahead of a close every {args.limit_s:g} s",
            TalkingRealtime(limit_s=args.limit_s, goaway_ahead_s=args.goaway_ahead_s),
            args.seconds,
        ),
    ]
    print(
        "\nlargest heard gap, ms: "
        + ", ".join(f"{r.max_gap_ms:.1f}" for r in reports)
        + " (reference, close, go-away)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the two calls")
    parser.add_argument("--reference-seconds", type=float, default=60.0)
    parser.add_argument("--limit-s", type=float, default=60.0, help="upstream socket lifetime")
    parser.add_argument("--goaway-ahead-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the adapter's warnings would split the table
    metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
