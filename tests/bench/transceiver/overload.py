"""Overload benchmark: N+10 offered calls on a transceiver at capacity; prints, asserts nothing.

Issue 20's promise: when the transceiver is saturated, new calls are refused
(RESOURCE_EXHAUSTED, which signaling turns into 503 + Retry-After) before the calls it
carries degrade. With the saturation benchmark's cheap callers (saturation.py: real ICE,
DTLS and SRTP set-up, pre-encoded Opus paced from the other core, media framed as the relay
frames it), one transceiver pinned to core 0 is ramped in batches until CreateSession is
refused (or to --calls N); the first N calls are measured, then --extra more are offered
one by one (admitted ones start sending at once), and the first N are measured again.

The same run is repeated with admission off (admission_max_loop_lag_ms=0,
admission_max_cpu_percent=0) and the same N: the in-run reference for what the extra
calls do when nothing refuses them.

Per phase, over the first N calls (echo at the client: caller -> transceiver -> bridge ->
transceiver -> caller): frames received per second per call (50 is every frame; min and
median), the longest gap between two frames of one call, and late or lost frames (more than
60 ms behind the stream's 20 ms clock, as saturation.py counts them); and the
transceiver's own event-loop lag (voiceedge_transceiver_event_loop_lag_ms, the median the
admission decision reads) and CPU.

Run: ./bazelw run //tests/bench:overload -- --mode transcoding
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import uvloop

from libs.service.testing import read_ready_line
from services.transceiver.transceiver_testing import create_request
from tests.bench.transceiver.bench import cpu_seconds, start_transceiver
from tests.bench.transceiver.saturation import (
    FRAME_S,
    LAG_LIMIT_MS,
    LATE_LIMIT,
    SETTLE_S,
    BridgeProcess,
    DirectMedia,
    LoadClient,
    Pacer,
    echo_points,
    lateness,
    native_relay,
    tone_packets,
)
from voiceedge.transceiver.v1 import transceiver_pb2_grpc

LAG_METRIC = re.compile(r"^voiceedge_transceiver_event_loop_lag_ms(?:\{[^}]*\})? (\S+)$", re.M)
SESSION_METRICS = re.compile(
    r"^(voiceedge_transceiver_(?:sessions_active|sessions_closed_total|udpmux_drop\w*))"
    r"(\{[^}]*\})? (\S+)$",
    re.M,
)
SCOPE_LABELS = re.compile(r'otel_scope_\w+="[^"]*",?')
WARM_UP_S = 2.5  # after a batch: jitter buffers fill and the 2 s lag window sees only it
UNTOUCHED_MARGIN = 0.005  # late ratio may rise this much (0.5 points) and still be untouched


@dataclass
class Quality:
    """The first N calls over one measured window."""

    calls: int
    fps_min: float
    fps_median: float
    longest_gap_ms: float
    late: int
    frames: int
    loop_lag_ms: float
    server_cpu: float
    pacer_lag_p99_ms: float = 0.0  # the generator's own lateness: over 10 ms, it lagged

    @property
    def late_ratio(self) -> float:
        return self.late / max(self.frames, 1)

    def row(self, label: str) -> str:
        return (
            f"    {label:7} {self.calls:4d} calls  frames/s per call min {self.fps_min:5.1f} "
            f"median {self.fps_median:5.1f}  longest gap {self.longest_gap_ms:6.0f} ms  "
            f"late/lost {100 * self.late_ratio:6.2f}%  loop lag {self.loop_lag_ms:5.1f} ms  "
            f"server CPU {100 * self.server_cpu:3.0f}%  "
            f"pacer lag p99 {self.pacer_lag_p99_ms:4.1f} ms"
        )


@dataclass
class RunResult:
    admission_ms: float
    cpu_percent: float
    calls: int
    stopped: str  # why the ramp ended at N
    before: Quality
    after: Quality
    admitted: int
    refused: int
    other_errors: int


def quality_of(logs: Sequence[list[tuple[float, int]]], window_s: float) -> Quality:
    """Quality (lag and CPU left 0) of per-call (arrival, RTP timestamp) logs; pure."""
    fps: list[float] = []
    gap = 0.0
    late = frames = 0
    expected = int(window_s / FRAME_S)
    for log in logs:
        fps.append(len(log) / window_s)
        times = sorted(t for t, _ in log)
        gap = max([gap, *(b - a for a, b in itertools.pairwise(times))])
        if not times:
            gap = max(gap, window_s)
        lt, n, _ = lateness(echo_points(log))
        if n == 0:
            lt, n = expected, expected
        late, frames = late + lt, frames + n
    median = statistics.median(fps) if fps else 0.0
    return Quality(len(logs), min(fps, default=0.0), median, gap * 1000, late, frames, 0, 0)


def scrape(metrics_address: str) -> str:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        return str(response.read().decode())


def loop_lag_ms(text: str) -> float:
    """The published median loop lag (what admission reads) in a /metrics text."""
    found = LAG_METRIC.search(text)
    return float(found[1]) if found else -1.0


def session_counters(text: str) -> str:
    """Active sessions, closes by reason and mux drops in a /metrics text, on one line."""
    found = [
        (name, SCOPE_LABELS.sub("", labels).replace("{}", ""), value)
        for name, labels, value in SESSION_METRICS.findall(text)
    ]
    return "  ".join(
        f"{name.removeprefix('voiceedge_transceiver_')}{labels} {value}"
        for name, labels, value in found
    )


class Overload:
    """One transceiver, one echo bridge, the generator's callers, one run."""

    def __init__(self, admission_ms: float, passthrough: bool, cpu_percent: float) -> None:
        self.admission_ms = admission_ms
        self.cpu_percent = cpu_percent
        self.passthrough = passthrough
        self.clients: list[LoadClient] = []
        self.pacer = Pacer(self.clients, tone_packets(50))
        self._index = 0

    def _pacer_p99_ms(self) -> float:
        """p99 of the pacer's lateness since the last call (and resets it)."""
        lags, self.pacer.lags = sorted(self.pacer.lags) or [0.0], []
        return lags[int(len(lags) * 0.99)] * 1000

    async def _metrics_lag(self) -> float:
        return loop_lag_ms(await asyncio.to_thread(scrape, self.metrics))

    async def print_counters(self) -> None:
        print(f"    {session_counters(await asyncio.to_thread(scrape, self.metrics))}", flush=True)

    async def offer(self, count: int) -> tuple[list[LoadClient], int, int]:
        """Offers `count` calls at once; (admitted and sending, refused, other errors)."""
        new = [LoadClient() for _ in range(count)]
        outcomes = await asyncio.gather(*(self._connect(c) for c in new))
        admitted = [c for c, ok in zip(new, outcomes, strict=True) if ok == "admitted"]
        for client in new:
            if client not in admitted:
                await client.close()
        if admitted:
            waits = [asyncio.ensure_future(c.connected.wait()) for c in admitted]
            _, pending = await asyncio.wait(waits, timeout=60)
            for wait in pending:
                wait.cancel()
        for client in admitted:
            if client.failed or not client.connected.is_set():
                client.failed = True  # admitted, but ICE or DTLS failed: an error, not a call
                await client.close()
        admitted = [c for c in admitted if not c.failed]
        for client in admitted:
            client.start_media()
        self.clients += admitted
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.heard.wait() for c in admitted))
        refused = outcomes.count("refused")
        return admitted, refused, count - len(admitted) - refused

    async def _connect(self, client: LoadClient) -> str:
        self._index += 1
        request = create_request(
            f"o{self._index}", await client.offer(), self.relay, opus_passthrough=self.passthrough
        )
        try:
            response = await self.stub.CreateSession(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "refused"
            print(f"    CreateSession: {exc.code().name} {exc.details()}", flush=True)
            return "error"
        await client.accept(response.answer_sdp)
        return "admitted"

    async def measure(self, first: int, window_s: float) -> Quality:
        """The first `first` calls over `window_s`, with the generator's garbage collection
        kept out of the window as saturation.py does."""
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            await asyncio.sleep(SETTLE_S)
            for client in self.clients:
                client.arrivals = []
            self.pacer.lags = []
            cpu0, wall0 = cpu_seconds(self.pid), time.monotonic()
            await asyncio.sleep(window_s)
            logs = [client.arrivals for client in self.clients[:first]]
            for client in self.clients:
                client.arrivals = []
            wall = time.monotonic() - wall0
            cpu = (cpu_seconds(self.pid) - cpu0) / wall
        finally:
            gc.enable()
        result = quality_of(logs, wall)
        result.loop_lag_ms = await self._metrics_lag()
        result.server_cpu = cpu
        result.pacer_lag_p99_ms = self._pacer_p99_ms()
        return result

    async def run(
        self, calls: int, max_calls: int, batch: int, extra: int, window_s: float
    ) -> RunResult:
        bridge = BridgeProcess()
        await bridge.start()
        flags = ["--admission-max-loop-lag-ms", f"{self.admission_ms:g}"]
        flags += ["--admission-max-cpu-percent", f"{self.cpu_percent:g}"]
        flags += ["--metrics-listen", "127.0.0.1:0"]
        process = start_transceiver(bridge.address, "", flags)
        self.pid = process.pid
        try:
            with contextlib.ExitStack() as stack:
                ready = read_ready_line(process, 60)
                self.metrics = str(ready["metrics"])
                host, port = ready["media"].rsplit(":", 1)
                relay = stack.enter_context(native_relay((host, int(port))))
                vip_host, _, vip_port = str(relay.ready["udp"][0]).rpartition(":")
                self.relay = (vip_host, int(vip_port))
                LoadClient.direct = DirectMedia((host, int(port)))
                stack.callback(LoadClient.direct.close)
                channel = grpc.aio.insecure_channel(ready["grpc"])
                self.stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)
                self.pacer.start()
                try:
                    return await self._phases(calls, max_calls, batch, extra, window_s)
                finally:
                    await self.pacer.stop()
                    await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
                    await channel.close(None)
        finally:
            LoadClient.direct = None
            process.terminate()
            process.wait(timeout=60)
            await bridge.stop()

    async def _phases(
        self, calls: int, max_calls: int, batch: int, extra: int, window_s: float
    ) -> RunResult:
        target = calls or max_calls
        stopped = f"{target} calls reached"
        t0 = time.monotonic()
        while len(self.clients) < target:
            existing = self.clients[:]
            up = len(self.clients)
            for client in existing:
                client.arrivals = []
            self.pacer.lags = []
            cpu0, wall0 = cpu_seconds(self.pid), time.monotonic()
            _, refused, errors = await self.offer(min(batch, target - len(self.clients)))
            await asyncio.sleep(WARM_UP_S)
            wall = time.monotonic() - wall0
            cpu = (cpu_seconds(self.pid) - cpu0) / wall
            # Rough (the generator's garbage collection is not kept out): how the calls
            # already up fared while this batch was set up and started.
            seen = quality_of([client.arrivals for client in existing], wall)
            print(
                f"    ramp {len(self.clients):4d} calls  refused {refused}  errors {errors}  "
                f"loop lag {await self._metrics_lag():5.1f} ms  server CPU {100 * cpu:3.0f}%  "
                f"earlier calls: late/lost {100 * seen.late_ratio:5.2f}% longest gap "
                f"{seen.longest_gap_ms:4.0f} ms  pacer lag p99 {self._pacer_p99_ms():4.1f} ms  "
                f"(t={time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            if errors and not self.clients:
                raise SystemExit("no call could be set up")
            if refused and not calls:
                stopped = "admission refused during the ramp"
                break
            if len(self.clients) == up:  # with --calls, admission may refuse every offer
                stopped = "a whole step refused or failed"
                print(f"    {stopped}: the ramp ends at {up} calls", flush=True)
                break
            if 2 * errors >= batch:
                stopped = "half a step's set-ups failed"
                print(f"    {stopped}: at capacity, ramp ends", flush=True)
                break
        first = len(self.clients)
        before = await self.measure(first, window_s)
        print(before.row("before"), flush=True)
        await self.print_counters()
        admitted = refused = other = 0
        for _ in range(extra):
            ok, no, err = await self.offer(1)
            admitted, refused, other = admitted + len(ok), refused + no, other + err
        print(
            f"    offered {extra} more: {admitted} admitted, {refused} refused "
            f"(RESOURCE_EXHAUSTED, 503 at signaling), {other} other errors",
            flush=True,
        )
        await asyncio.sleep(WARM_UP_S - SETTLE_S)
        after = await self.measure(first, window_s)
        print(after.row("after"), flush=True)
        await self.print_counters()
        return RunResult(
            self.admission_ms,
            self.cpu_percent,
            first,
            stopped,
            before,
            after,
            admitted,
            refused,
            other,
        )


def untouched(result: RunResult) -> bool:
    """The first N calls are no worse after the extra offers (saturation.py's 1 % bound)."""
    after = result.after.late_ratio
    return after < LATE_LIMIT and after <= result.before.late_ratio + UNTOUCHED_MARGIN


def held(result: RunResult) -> str:
    """untouched / DEGRADED, and whether the generator itself lagged in the after window."""
    text = "untouched" if untouched(result) else "DEGRADED"
    if result.after.pacer_lag_p99_ms > LAG_LIMIT_MS:
        text += " (the generator lagged: not the server's alone)"
    return text


def verdict(on: RunResult, off: RunResult | None) -> str:
    text = (
        f"VERDICT admission {on.admission_ms:g} ms / {on.cpu_percent:g} %: at {on.calls} calls "
        f"({on.stopped}) "
        f"{on.refused}/{on.admitted + on.refused + on.other_errors} extra refused, first "
        f"{on.calls} {held(on)} (late {100 * on.before.late_ratio:.2f}% -> "
        f"{100 * on.after.late_ratio:.2f}%)"
    )
    if off is not None:
        text += (
            f"; admission off: {off.admitted} admitted, first {off.calls} "
            f"{held(off)} "
            f"({100 * off.before.late_ratio:.2f}% -> {100 * off.after.late_ratio:.2f}%)"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mode", choices=("transcoding", "passthrough"), default="transcoding")
    parser.add_argument(
        "--admission-ms", type=float, default=50.0, help="admission_max_loop_lag_ms under test"
    )
    parser.add_argument(
        "--admission-cpu",
        type=float,
        default=90.0,
        help="admission_max_cpu_percent under test (0: off)",
    )
    parser.add_argument("--calls", type=int, default=0, help="N (default: ramp to a refusal)")
    parser.add_argument("--max-calls", type=int, default=400, help="ramp bound without --calls")
    parser.add_argument("--batch", type=int, default=10, help="calls offered per ramp step")
    parser.add_argument("--extra", type=int, default=10, help="calls offered at N")
    parser.add_argument("--window-seconds", type=float, default=10.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the admission-off run")
    args = parser.parse_args(argv)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    with open("/proc/loadavg") as loadavg:
        print(f"load average at start: {loadavg.read().split()[:3]}", flush=True)
    passthrough = args.mode == "passthrough"
    run = (args.calls, args.max_calls, args.batch, args.extra, args.window_seconds)
    print(
        f"{args.mode}, admission_max_loop_lag_ms={args.admission_ms:g}, "
        f"admission_max_cpu_percent={args.admission_cpu:g}:",
        flush=True,
    )
    on = asyncio.run(Overload(args.admission_ms, passthrough, args.admission_cpu).run(*run))
    off: RunResult | None = None
    if not args.no_reference:
        print(f"{args.mode}, admission off (0), same N={on.calls}:", flush=True)
        off = asyncio.run(Overload(0.0, passthrough, 0.0).run(on.calls, *run[1:]))
    with open("/proc/loadavg") as loadavg:
        print(f"load average at end: {loadavg.read().split()[:3]}")
    print(verdict(on, off))
    return 0


if __name__ == "__main__":
    sys.exit(main())
