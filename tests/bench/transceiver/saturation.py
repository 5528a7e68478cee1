"""Transceiver saturation benchmark: prints figures, asserts nothing.

How many concurrent echo sessions one server process, pinned to core 0, carries while under
1 % of the 20 ms frames are more than 60 ms late; for our transceiver (transcoding 24 kHz and
Opus passthrough, behind the relay framing on one UDP port, echo bridge over gRPC) and for a
stock aiortc echo server (stock_echo.py: one peer connection and UDP port per session, no
relay) measured in the same run. The session count steps up (--steps); each step runs
--step-seconds after a warm-up; the search stops at the first step with >= 1 % late frames.

Load generator (this process on uvloop, the other core; the echo bridge is a process of its
own there, echo_bridge.py, so its arrival times never wait for the generator's loop):
real aiortc peer connections for ICE, DTLS and SRTP keys, but media bypasses aiortc's
per-packet path: a pacer sends pre-encoded Opus (a 440 Hz tone) as ready RTP through the
connection's SRTP session, staggered over the 20 ms period, and received SRTP is
time-stamped from its clear-text RTP header, never decrypted or decoded.

Between clients and our transceiver (--relay): by default `direct`, ICE and DTLS set-up
through the real relay process, then media framed by the generator itself exactly as the
relay frames it, on one socket with batched I/O (DirectMedia): the transceiver sees the
relay's wire format on its one port, and the other core is left to the generator and the
bridge. `native` puts the real relay process on that core as well (it forwards every
packet twice, and at 300+ sessions competes with the generator); the relay's own cost is
measured by tests/bench/relay_bench.py.

The generator's full garbage collections took 100+ ms at 400 sessions (hundreds of aiortc
peers) and counted as the server's late frames: one runs before each measured window, the
survivors are frozen out of later ones (gc.freeze), none runs inside the window, and a
settle second lets the pacer catch up first.

Late, per session and direction, against that stream's own 20 ms clock: frame k (from the
RTP timestamp / the bridge's frame sequence) is expected at base + k * 20 ms, where base is
the earliest (arrival - k * 20 ms) in the step; it is late if it arrives more than 60 ms
after that, and a frame missing inside the step's span counts as late. Directions:
"echo at client" (server -> client, both servers) and "caller at bridge" (transceiver ->
bridge, ours only); the step's figure is the worse of the two. A failing step whose pacer
ran late (p99 tick lag over 10 ms: the generator, not the server, fell behind) is measured
once more.

`--receive-paths direct,adaptive` runs each of our modes once per receive path (the
transceiver's `receive_path` setting), one after the other, and prints the server CPU of
the two at every step both measured.

Run: ./bazelw run //tests/bench/transceiver:saturation -- --step-seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc.aio
import numpy as np
import uvloop
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from libs.fastio import fastio
from libs.service.testing import binary, read_ready_line, running_service
from libs.wire import framing
from libs.wire.classify import is_rtp
from services.transceiver import aiortc_compat
from services.transceiver.media import OpusPacketizer
from services.transceiver.transceiver_testing import FramingRelay, create_request
from tests.bench.transceiver.bench import cpu_seconds, pinned, rss_kib, start_transceiver
from voiceedge.transceiver.v1 import transceiver_pb2_grpc

FRAME_S = 0.02
LATE_S = 0.06
LATE_LIMIT = 0.01
LAG_LIMIT_MS = 10.0  # pacer p99 lag above this: the load generator, not the server, lagged
SETTLE_S = 1.0  # after the generator's pre-window garbage collection
GROUPS = 10  # the pacer sends to one tenth of the sessions every 2 ms
RTP_HEADER = struct.Struct("!BBHII")
RTP_TS = struct.Struct("!I")
OPUS_TICKS = 960  # 20 ms at the 48 kHz RTP clock of Opus (RFC 7587 §4.1)
DEFAULT_STEPS = "10,20,40,60,80,100,120,150,200,250,300,400,500"


class IdleTrack(MediaStreamTrack):
    """Gives the client a send m-line; never yields, so aiortc's sender task sleeps."""

    kind = "audio"

    async def recv(self) -> Any:
        await asyncio.get_running_loop().create_future()


class DirectMedia:
    """`--relay direct`: the relay's wire contract for media inside the generator, batched.

    ICE and DTLS set-up still go through the real relay. Then every client's RTP leaves this
    one socket framed with the client's address (as the relay would frame it), one sendmmsg
    per pacer tick, straight to the transceiver's mux; the mux answers the relay that last
    sent, so echoes come back here, are unwrapped (recvmmsg) and handed to that client's
    aioice protocol (RTP to its arrival log, the rest to aioice/aiortc as usual). This
    takes the relay process and one sendto per packet off the generator's core."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        io = fastio.load()
        if io is None:
            raise SystemExit("--relay direct needs libs/fastio/native:fastio.so")
        self._io = io
        self.upstream = upstream
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fastio.set_buffers(self._sock)  # every echo arrives here: the server's 20 ms bursts
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        # by the framing header of the client's address: (load client, aioice protocol, vip)
        self._clients: dict[bytes, tuple[LoadClient, Any, tuple[str, int]]] = {}
        self._headers: dict[tuple[str, int], bytes] = {}
        self._out: list[tuple[tuple[str, int], bytes]] = []
        self.unsent = 0
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def register(
        self, address: tuple[str, int], client: LoadClient, protocol: Any, vip: tuple[str, int]
    ) -> None:
        header = self._headers[address] = framing.header(address[0], address[1])
        self._clients[header] = (client, protocol, vip)

    def queue(self, client: tuple[str, int], payload: bytes) -> None:
        self._out.append((self.upstream, self._headers[client] + payload))

    def flush(self) -> None:
        out, self._out = self._out, []
        if out:
            self.unsent += len(out) - self._io.send_batch(self._sock.fileno(), out)

    def _readable(self) -> None:
        """RTP is time-stamped once per recvmmsg batch straight into the client's log; the
        rest (STUN, DTLS, RTCP) goes to the client's aioice protocol. Frames are matched
        by their whole IPv4 header (every client here is on 127.0.0.1)."""
        clients = self._clients
        for _ in range(8):  # bounded per wake-up, then back to the loop
            items = self._io.recv_batch(self._sock.fileno(), 64)
            now = time.monotonic()
            for data, _addr in items:
                entry = clients.get(data[: framing.HEADER_V4])
                if entry is None:
                    continue
                payload = data[framing.HEADER_V4 :]
                if is_rtp(payload):
                    entry[0].record(now, payload)
                else:
                    entry[1].datagram_received(payload, entry[2])
            if len(items) < 64:
                return

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


class LoadClient:
    direct: DirectMedia | None = None  # set for --relay direct

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(IdleTrack())
        self.arrivals: list[tuple[float, int]] = []
        self.connected = asyncio.Event()
        self.heard = asyncio.Event()  # the first echo packet arrived
        self.failed = False
        self._transport: asyncio.DatagramTransport | None = None
        self._remote: tuple[str, int] = ("", 0)
        self._local: tuple[str, int] = ("", 0)
        self._protect: Callable[[bytes], bytes] | None = None
        self._ssrc = 0
        self._pt = 0
        self._seq = random.randrange(0x10000)
        self._ts0 = random.randrange(0x100000000)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()
        elif self.pc.connectionState in ("failed", "closed"):
            self.failed = True
            self.connected.set()

    def _on_rtp(self, data: bytes) -> None:
        self.record(time.monotonic(), data)

    def record(self, arrival: float, data: bytes) -> None:
        self.arrivals.append((arrival, RTP_TS.unpack_from(data, 4)[0]))
        if len(self.arrivals) == 1:
            self.heard.set()

    async def offer(self) -> str:
        (transport,) = await aiortc_compat.add_loopback_host_candidate(self.pc)
        self._transport = cast(asyncio.DatagramTransport, transport)
        aiortc_compat.tap_rtp_datagrams(transport, self._on_rtp)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = str(self.pc.localDescription.sdp)
        ssrc = re.search(r"a=ssrc:(\d+) ", sdp)
        pt = re.search(r"a=rtpmap:(\d+) opus/", sdp)
        assert ssrc is not None
        assert pt is not None
        self._ssrc, self._pt = int(ssrc[1]), int(pt[1])
        return sdp

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    def start_media(self) -> None:
        (ice,) = aiortc_compat.ice_transports(self.pc)
        pair = aiortc_compat.selected_pair(aiortc_compat.connection_of(ice))
        assert pair is not None
        self._remote = pair.remote
        self._protect = aiortc_compat.srtp_sessions(self.pc).outbound.protect
        if self.direct is not None and self._transport is not None:
            local = self._transport.get_extra_info("sockname")
            self._local = (str(local[0]), int(local[1]))
            self.direct.register(self._local, self, self._transport.get_protocol(), self._remote)

    def send(self, index: int, payload: bytes) -> None:
        if self._protect is None or self._transport is None:
            return
        header = RTP_HEADER.pack(
            0x80,
            self._pt,
            (self._seq + index) & 0xFFFF,
            (self._ts0 + index * OPUS_TICKS) & 0xFFFFFFFF,
            self._ssrc,
        )
        if self.direct is not None:
            self.direct.queue(self._local, self._protect(header + payload))
        else:
            self._transport.sendto(self._protect(header + payload), self._remote)

    async def close(self) -> None:
        await self.pc.close()
        await aiortc_compat.wait_pc_closed(self.pc)


def lateness(points: Sequence[tuple[float, float]]) -> tuple[int, int, float]:
    """(late, frames, worst lateness in s) of one stream's (frame index k, arrival time)
    points against its best-aligned 20 ms clock; frames missing inside the span are late.
    Pure."""
    if not points:
        return 0, 0, 0.0
    base = min(t - k * FRAME_S for k, t in points)
    delays = [t - (base + k * FRAME_S) for k, t in points]
    late = sum(1 for d in delays if d > LATE_S)
    first = min(k for k, _ in points)
    span = round(max(k for k, _ in points) - first) + 1
    missing = max(0, span - len({round(k) for k, _ in points}))
    return late + missing, max(span, len(points)), max(delays)


def echo_points(arrivals: Sequence[tuple[float, int]]) -> list[tuple[float, float]]:
    """Received RTP (arrival, timestamp) -> (frame index from the RTP timestamp, arrival);
    timestamps before the first arrival's (reordered) give negative indices, not a wrap."""
    if not arrivals:
        return []
    first_ts = arrivals[0][1]
    return [
        ((((ts - first_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000) / OPUS_TICKS, t)
        for t, ts in arrivals
    ]


@dataclass
class StepResult:
    sessions: int
    late_echo: tuple[int, int]
    late_bridge: tuple[int, int] | None
    worst_ms: float
    server_cpu: float
    generator_cpu: float
    send_lag_p99_ms: float
    rss_per_session_kib: float

    @property
    def late_ratio(self) -> float:
        ratios = [self.late_echo[0] / max(self.late_echo[1], 1)]
        if self.late_bridge is not None:
            ratios.append(self.late_bridge[0] / max(self.late_bridge[1], 1))
        return max(ratios)


class Pacer:
    """Sends frame k of every client at start + k * 20 ms, client i offset by (i % 10) * 2 ms."""

    def __init__(self, clients: list[LoadClient], payloads: list[bytes]) -> None:
        self.clients = clients
        self.payloads = payloads
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = FRAME_S / GROUPS
        step = 0
        while True:
            target = start + step * tick
            delay = target - loop.time()
            # Behind schedule it still yields once per tick, so arrivals are read (and
            # time-stamped) between catch-up sends instead of after all of them.
            await asyncio.sleep(max(delay, 0.0))
            self.lags.append(loop.time() - target)
            group, frame = step % GROUPS, step // GROUPS
            payload = self.payloads[frame % len(self.payloads)]
            for client in self.clients[group::GROUPS]:
                client.send(frame, payload)
            if LoadClient.direct is not None:
                LoadClient.direct.flush()
            step += 1


class BridgeProcess:
    """The echo bridge (echo_bridge.py) in its own process on core 1: its arrival times
    (the "caller at bridge" direction) do not wait for this generator's event loop."""

    def __init__(self) -> None:
        self.address = ""
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            "nice",
            "-n",
            "10",
            *pinned(1),
            *binary("tests/bench/transceiver", "echo_bridge"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=1 << 28,  # the arrival logs of every stream come back as one line
        )
        self.address = str((await self._ask(None))["address"])

    async def _ask(self, command: dict[str, bool] | None) -> dict[str, Any]:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        if command is not None:
            process.stdin.write(json.dumps(command).encode() + b"\n")
            await process.stdin.drain()
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        if not line:
            raise RuntimeError("echo bridge process ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def clear(self) -> None:
        await self._ask({"clear": True})

    async def arrivals(self) -> list[list[tuple[float, float]]]:
        """Per stream since the last clear(): (frame sequence, arrival time.monotonic())
        points, as lateness() takes them."""
        streams = (await self._ask({"arrivals": True}))["streams"]
        return [[(float(k), float(t)) for k, t in stream] for stream in streams]

    async def stop(self) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        process.stdin.close()
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def tone_packets(count: int) -> list[bytes]:
    encoder = OpusPacketizer(48000)
    out: list[bytes] = []
    for i in range(count + 5):
        t = (np.arange(960) + i * 960) / 48000.0
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440.0 * t)).astype(np.int16)
        packet = encoder.encode(pcm.tobytes())
        if packet is not None and i >= 5:
            out.append(packet)
    return out


Connect = Callable[[LoadClient, int], Awaitable[None]]


async def ramp(
    name: str,
    pid: int,
    connect: Connect,
    steps: list[int],
    step_seconds: float,
    bridge: BridgeProcess | None,
) -> list[StepResult]:
    clients: list[LoadClient] = []
    pacer = Pacer(clients, tone_packets(50))
    pacer.start()
    results: list[StepResult] = []
    idle_rss = rss_kib(pid)
    try:
        for count in steps:
            new = [LoadClient() for _ in range(count - len(clients))]
            for start in range(0, len(new), 10):
                batch = new[start : start + 10]
                await asyncio.gather(
                    *(connect(c, len(clients) + start + i) for i, c in enumerate(batch))
                )
            async with asyncio.timeout(60):
                await asyncio.gather(*(c.connected.wait() for c in new))
            if any(c.failed for c in new):
                print(f"{name}: {count} sessions: a connection failed; stopping", flush=True)
                break
            for client in new:
                client.start_media()
            clients += new  # the pacer sends to them from its next tick
            async with asyncio.timeout(30):
                await asyncio.gather(*(c.heard.wait() for c in new))
            await asyncio.sleep(2.0)  # warm-up: jitter buffers, playout prebuffer
            for attempt in range(2):
                # The generator's own full garbage collections (hundreds of aiortc peers,
                # arrival logs) pause its loop for 100+ ms at 400 sessions: one now, the
                # survivors frozen out of later ones, none during the window, and a settle
                # second before it so the pacer has caught up with the collection's pause.
                gc.collect()
                gc.freeze()
                gc.disable()
                try:
                    await asyncio.sleep(SETTLE_S)
                    for client in clients:
                        client.arrivals = []
                    if bridge is not None:
                        await bridge.clear()
                    pacer.lags = []
                    cpu0, gen0, wall0 = cpu_seconds(pid), time.process_time(), time.monotonic()
                    await asyncio.sleep(step_seconds)
                    # The window's logs, taken before any await or computation: the pacer and
                    # the arrival logs go on while results are computed (hundreds of ms at
                    # 400 sessions), which must not count as the window's lag.
                    lags = sorted(pacer.lags) or [0.0]
                    echo_logs = [client.arrivals for client in clients]
                    for client in clients:
                        client.arrivals = []
                    wall = time.monotonic() - wall0
                    server_cpu = (cpu_seconds(pid) - cpu0) / wall
                    generator_cpu = (time.process_time() - gen0) / wall
                    bridge_logs = await bridge.arrivals() if bridge is not None else None
                finally:
                    gc.enable()
                expected = int(step_seconds / FRAME_S)
                late = total = 0
                worst = 0.0
                for log in echo_logs:
                    lt, n, w = lateness(echo_points(log))
                    if n == 0:
                        lt, n, w = expected, expected, step_seconds  # heard nothing in the step
                    late, total, worst = late + lt, total + n, max(worst, w)
                late_bridge: tuple[int, int] | None = None
                if bridge_logs is not None:
                    blate = btotal = 0
                    for points in bridge_logs:
                        lt, n, w = lateness(points)
                        blate, btotal, worst = blate + lt, btotal + n, max(worst, w)
                    late_bridge = (blate, btotal)
                result = StepResult(
                    count,
                    (late, total),
                    late_bridge,
                    worst * 1000,
                    server_cpu,
                    generator_cpu,
                    lags[int(len(lags) * 0.99)] * 1000,
                    (rss_kib(pid) - idle_rss) / count,
                )
                if result.late_ratio < LATE_LIMIT or result.send_lag_p99_ms < LAG_LIMIT_MS:
                    break
                if attempt == 0:  # the generator itself fell behind: measure once more
                    print_row(name, result, note="generator lagged, step repeated")
            results.append(result)
            print_row(name, result)
            if result.late_ratio >= LATE_LIMIT:
                break
    finally:
        await pacer.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return results


def print_row(name: str, r: StepResult, note: str = "") -> None:
    bridge = "-"
    if r.late_bridge is not None:
        bridge = f"{100 * r.late_bridge[0] / max(r.late_bridge[1], 1):.2f}%"
    print(
        f"  {name:22} {r.sessions:5d} sessions  late: echo "
        f"{100 * r.late_echo[0] / max(r.late_echo[1], 1):6.2f}% bridge {bridge:>7} "
        f"worst {r.worst_ms:5.0f} ms  "
        f"server CPU {100 * r.server_cpu:4.0f}%  generator CPU {100 * r.generator_cpu:4.0f}%  "
        f"send lag p99 {r.send_lag_p99_ms:5.1f} ms  RSS/session {r.rss_per_session_kib:6.0f} KiB"
        + (f"  ({note})" if note else ""),
        flush=True,
    )


def native_relay(media: tuple[str, int]) -> contextlib.AbstractContextManager[Any]:
    """The real relay (services/relay, native recvmmsg/sendmmsg path, one worker) on core 1,
    with a static route to the transceiver under test."""
    args = [
        "--workers",
        "1",
        "--tcp-listen",
        "127.0.0.1:0",
        "--udp-listen",
        "127.0.0.1:0",
        "--transceivers",
        f"1/1={media[0]}:{media[1]}",
        "--log-level",
        "WARNING",
    ]
    return running_service([*pinned(1), *binary("services/relay")], args)


async def run_ours(
    passthrough: bool,
    steps: list[int],
    step_seconds: float,
    relay_kind: str,
    profile: str = "",
    receive_path: str = "",
) -> list[StepResult]:
    """Our transceiver, on its default receive path or on `receive_path` (its setting)."""
    bridge = BridgeProcess()
    await bridge.start()
    # Admission off (issue 20: it refuses sessions once the loop lags or the CPU is high):
    # this benchmark finds where lateness, not admission, sets the limit.
    flags = ["--admission-max-loop-lag-ms", "0", "--admission-max-cpu-percent", "0"]
    if receive_path:
        flags += ["--receive-path", receive_path]
    process = start_transceiver(bridge.address, profile, flags)
    python_relay: FramingRelay | None = None
    try:
        with contextlib.ExitStack() as stack:
            ready = read_ready_line(process, 60)
            host, port = ready["media"].rsplit(":", 1)
            if relay_kind in ("native", "direct"):
                relay = stack.enter_context(native_relay((host, int(port))))
                vip_host, _, vip_port = str(relay.ready["udp"][0]).rpartition(":")
                relay_address = (vip_host, int(vip_port))
                if relay_kind == "direct":
                    LoadClient.direct = DirectMedia((host, int(port)))
                    stack.callback(LoadClient.direct.close)
            else:
                python_relay = await FramingRelay.start((host, int(port)))
                relay_address = python_relay.address
            channel = grpc.aio.insecure_channel(ready["grpc"])
            stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)

            async def connect(client: LoadClient, index: int) -> None:
                request = create_request(
                    f"s{index}", await client.offer(), relay_address, opus_passthrough=passthrough
                )
                response = await stub.CreateSession(request, timeout=30)
                await client.accept(response.answer_sdp)

            name = "ours, passthrough" if passthrough else "ours, transcoding"
            if receive_path:
                name += f", {receive_path}"
            results = await ramp(name, process.pid, connect, steps, step_seconds, bridge)
            await channel.close(None)
            return results
    finally:
        if python_relay is not None:
            await python_relay.close()
        process.terminate()
        process.wait(timeout=60)
        await bridge.stop()


async def run_stock(steps: list[int], step_seconds: float) -> list[StepResult]:
    process = await asyncio.create_subprocess_exec(
        *pinned(0),
        *binary("tests/bench/transceiver", "stock_echo"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    stdin, stdout = process.stdin, process.stdout
    lock = asyncio.Lock()
    try:
        async with asyncio.timeout(60):
            assert json.loads(await stdout.readline()) == {"ready": True}

        async def connect(client: LoadClient, index: int) -> None:
            offer = await client.offer()
            async with lock:
                stdin.write(json.dumps({"offer": offer}).encode() + b"\n")
                await stdin.drain()
                reply = json.loads(await stdout.readline())
            await client.accept(reply["answer"])

        return await ramp("stock aiortc echo", process.pid, connect, steps, step_seconds, None)
    finally:
        stdin.write(b'{"close": true}\n')
        try:
            async with asyncio.timeout(60):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def summary(name: str, results: list[StepResult]) -> None:
    good = [r for r in results if r.late_ratio < LATE_LIMIT]
    if not good:
        print(f"{name}: no step under 1 % late")
        return
    best = good[-1]
    bad = "not reached" if len(good) == len(results) else f"{results[len(good)].sessions}"
    print(
        f"{name}: {best.sessions} sessions under 1 % late (first step over: {bad}); "
        f"server CPU {100 * best.server_cpu:.0f}% there, RSS {best.rss_per_session_kib:.0f} "
        "KiB/session"
    )


def compare_paths(mode: str, direct: list[StepResult], adaptive: list[StepResult]) -> str:
    """The adaptive receive path against the direct one (issue 19: it must not cost more
    than 15 % of the sessions per core): the capacity each reached and the server CPU at
    every step both measured."""

    def capacity(results: list[StepResult]) -> int:
        good = [r.sessions for r in results if r.late_ratio < LATE_LIMIT]
        return good[-1] if good else 0

    parts = [
        f"{mode}: under 1 % late up to {capacity(direct)} direct, {capacity(adaptive)} adaptive"
    ]
    by_count = {r.sessions: r for r in direct}
    for r in adaptive:
        base = by_count.get(r.sessions)
        if base is not None and base.server_cpu > 0:
            parts.append(
                f"CPU at {r.sessions}: {100 * base.server_cpu:.0f} % -> "
                f"{100 * r.server_cpu:.0f} % ({100 * (r.server_cpu / base.server_cpu - 1):+.0f} %)"
            )
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="session counts, ascending")
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument(
        "--modes", default="stock,transcoding,passthrough", help="which servers, in order"
    )
    parser.add_argument(
        "--relay",
        choices=("native", "python", "direct"),
        default="direct",
        help="between clients and our transceiver: direct (the default): set-up through "
        "the real relay, media framed by the generator itself with batched I/O (see "
        "DirectMedia); native: the real relay process (batched I/O, core 1) for media too; "
        "python: the testkit's FramingRelay inside the generator process",
    )
    parser.add_argument(
        "--receive-paths",
        default="",
        help="our transceiver's receive_path setting, comma-separated (direct,adaptive: each "
        "mode once per path, one after the other, and a comparison); default: its default",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="run our transceiver under cProfile, stats to PATH.<mode> (figures then include "
        "the profiler's cost)",
    )
    args = parser.parse_args(argv)
    # The generator's own loop: uvloop, as the transceiver under test uses (the stock echo
    # server keeps aiortc's example set-up, the default loop).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    steps = [int(s) for s in args.steps.split(",")]
    receive_paths = [p.strip() for p in args.receive_paths.split(",") if p.strip()] or [""]
    if set(receive_paths) - {"", "direct", "adaptive"}:
        parser.error("--receive-paths: of direct,adaptive")
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    with open("/proc/loadavg") as loadavg:
        print(f"load average at start: {loadavg.read().split()[:3]}", flush=True)
    all_results: dict[str, list[StepResult]] = {}
    for mode in args.modes.split(","):
        if mode == "stock":
            all_results["stock aiortc echo"] = asyncio.run(run_stock(steps, args.step_seconds))
        elif mode in ("transcoding", "passthrough"):
            for path in receive_paths:
                suffix = f".{path}" if path else ""
                results = asyncio.run(
                    run_ours(
                        mode == "passthrough",
                        steps,
                        args.step_seconds,
                        args.relay,
                        f"{args.profile}.{mode}{suffix}" if args.profile else "",
                        path,
                    )
                )
                all_results[f"ours, {mode}" + (f", {path}" if path else "")] = results
        else:
            parser.error(f"unknown mode {mode}")
    with open("/proc/loadavg") as loadavg:
        print(f"load average at end: {loadavg.read().split()[:3]}")
    for name, results in all_results.items():
        summary(name, results)
    for mode in ("transcoding", "passthrough"):
        direct = all_results.get(f"ours, {mode}, direct")
        adaptive = all_results.get(f"ours, {mode}, adaptive")
        if direct is not None and adaptive is not None:
            print(compare_paths(mode, direct, adaptive))
    return 0


if __name__ == "__main__":
    sys.exit(main())
