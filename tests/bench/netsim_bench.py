"""Figures for calls across the netsim standard layout (tools/netsim/edge.py), printed, never
asserted. Results are recorded in BENCHMARKS.md.

    ./bazelw run //tests/bench:netsim -- --link-only          # the impairment link itself
    ./bazelw run //tests/bench:netsim -- --calls 3            # a clean access link
    ./bazelw run //tests/bench:netsim -- --delay-ms 25 --jitter-ms 20 --loss 0.03 --burst 3
    ./bazelw run //tests/bench:netsim -- --rebind              # NAT rebinding mid-call
    ./bazelw run //tests/bench:netsim -- --chromium-rebind 3   # the same with Chromium
    ./bazelw run //tests/bench:netsim -- --seconds 600 --loss 0.02   # the long call

Per call: POST to 201, answer to connected, first audio each way (ms and in RTTs of the
path: the median UDP probe RTT from the client to the relay host), audio continuity (longest
gap between the agent's frames at the client, % of 20 ms frames delivered each way), and the
transceiver's memory (VmRSS) at the start and end. Per run: the relay path's added latency,
the median round trip of a STUN check through relay and transceiver minus the UDP probe's
to the relay host over the same access link (relay + internal hop + the transceiver's answer:
an upper bound on the relay's own share). `--link-only` measures the forwarder: its added
one-way latency against a plain veth, and the packets per second it passes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult
from libs.wire import stun
from tests.netsim import calls
from tools.netsim import layout, net
from tools.netsim.edge import NetEdge, standard_edge
from tools.netsim.forwarder import ImpairedLink
from tools.netsim.impair import Profile
from tools.netsim.probe import EchoServer, Summary, probe, summarise

FRAME_S = 0.020
ECHO_PORT = 7000


@dataclass
class CallFigures:
    post_to_201_ms: float
    answer_to_connected_ms: float
    first_audio_down_after_connected_ms: float
    first_audio_up_after_session_created_ms: float
    longest_gap_down_ms: float
    delivered_down_pct: float
    delivered_up_pct: float
    transceiver_rss_kib_start: int
    transceiver_rss_kib_end: int
    rebind: dict[str, float] | None = None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _wait_for(check: Any, timeout_s: float, step_s: float = 0.02) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        await asyncio.sleep(step_s)
    return float("nan")


async def one_call(edge: NetEdge, seconds: float, rebind: bool) -> CallFigures:
    """One aiortc call from the client host (examples/python_client, as the tests place)."""
    pid = edge.stack.services["transceiver"].process.pid
    rss_start = _rss_kib(pid)
    seen: dict[str, Any] = {}

    async def during(pc: RTCPeerConnection, result: CallResult) -> None:
        await _wait_for(lambda: bool(result.arrivals), 10)
        if rebind:
            await asyncio.sleep(2.0)
            seen["rebind"] = await _rebind(edge, result.arrivals)
        await asyncio.sleep(max(0.0, result.times["connected"] + seconds - time.monotonic()))
        seen["end"] = time.monotonic()
        seen["stats"] = calls.live_session(edge).stats

    result = await calls.call_from_client(edge, during, connect_timeout_s=30)
    if not result.connected:
        raise RuntimeError(f"call failed: {result.status} {result.error_body}")
    times, t_end, stats = result.times, seen["end"], seen["stats"]
    down = [t for t in result.arrivals if t <= t_end]
    gaps = [b - a for a, b in itertools.pairwise(down)]
    expected_down = (t_end - down[0]) / FRAME_S if down else 1
    sent_up = stats.packets_received + stats.packets_lost
    return CallFigures(
        post_to_201_ms=(times["answer"] - times["post"]) * 1000,
        answer_to_connected_ms=(times["connected"] - times["answer"]) * 1000,
        first_audio_down_after_connected_ms=(down[0] - times["connected"]) * 1000,
        first_audio_up_after_session_created_ms=stats.time_to_first_audio_in_ms,
        longest_gap_down_ms=max(gaps) * 1000 if gaps else -1,
        delivered_down_pct=min(100.0, 100.0 * len(down) / expected_down),
        delivered_up_pct=100.0 * stats.packets_received / sent_up if sent_up else 0.0,
        transceiver_rss_kib_start=rss_start,
        transceiver_rss_kib_end=_rss_kib(pid),
        rebind=seen.get("rebind"),
    )


async def _rebind(edge: NetEdge, arrivals: list[float]) -> dict[str, float]:
    """Rebinds the NAT; seconds until each direction's audio and the selected pair moved."""
    before = calls.live_session(edge).stats
    edge.nat.rebind()
    t0 = time.monotonic()
    frames_at = len(arrivals)
    port = before.selected_remote_address.port

    def moved() -> bool:
        return calls.live_session(edge).stats.selected_remote_address.port not in (0, port)

    t_moved = await _wait_for(moved, 30, 0.05)
    up_at = calls.live_session(edge).stats.packets_received
    t_up = await _wait_for(
        lambda: calls.live_session(edge).stats.packets_received > up_at + 5, 30, 0.05
    )
    # Frames keep coming for a while from the client's jitter buffer: the outage is the
    # longest gap between frames around the rebinding, until the pair has moved.
    t_down = await _wait_for(lambda: bool(arrivals) and arrivals[-1] > t_moved + 0.1, 30)
    around = [t for t in arrivals[max(0, frames_at - 5) :] if t <= t_down]
    gaps = [b - a for a, b in itertools.pairwise(around)]
    return {
        "pair_moved_s": t_moved - t0,
        "audio_up_resumed_s": t_up - t0,
        "audio_down_outage_s": max(gaps) if gaps else float("nan"),
        "audio_down_resumed_s": t_down - t0,
    }


def _longest_stall(samples: list[tuple[float, int]]) -> float:
    """Longest time a packet counter (sampled as (time, count)) did not move."""
    longest, since, last = 0.0, samples[0][0], samples[0][1]
    for at, count in samples[1:]:
        if count != last:
            longest = max(longest, at - since)
            since, last = at, count
    return max(longest, samples[-1][0] - since)


def chromium_rebind(edge: NetEdge, workdir: Path, calls_n: int) -> None:
    """Chromium on the demo page from the client host; the NAT rebinds 2 s into each call.
    Prints how long each direction's packet counter stood still around the rebinding."""
    from selenium.webdriver.common.by import By  # only this mode needs a browser

    from tests.e2e.browser import chromium, js, write_tone_wav

    wav = workdir / "tone.wav"
    write_tone_wav(wav, tone_s=1.0, silence_s=1.6, tone_hz=calls.TONE_HZ)
    with (
        edge.testbed.entered("client"),
        chromium(workdir, wav, secure_origin=edge.http_base) as browser,
    ):
        for index in range(calls_n):
            browser.get(edge.http_base + "/")
            browser.execute_script(calls.KEY_INSTEAD_OF_SECRET)
            browser.find_element(By.ID, "talk").click()
            deadline = time.monotonic() + 30
            while js(browser, "window.voiceedgeState") != "connected":
                if time.monotonic() > deadline:
                    raise RuntimeError("Chromium did not connect")
                time.sleep(0.05)
            time.sleep(2.0)
            down: list[tuple[float, int]] = []
            up: list[tuple[float, int]] = []
            edge.nat.rebind()
            t0 = time.monotonic()
            while time.monotonic() < t0 + 10:
                down.append((time.monotonic(), int(js(browser, calls.INBOUND_PACKETS))))
                with edge.testbed.entered("cluster"):
                    count = calls.live_session(edge).stats.packets_received
                up.append((time.monotonic(), int(count)))
                time.sleep(0.02)
            print(
                f"chromium call {index + 1}: rebinding outage down "
                f"{_longest_stall(down):.2f} s, up {_longest_stall(up):.2f} s"
            )
            browser.find_element(By.ID, "talk").click()
            while js(browser, "document.getElementById('state').textContent") != "idle":
                time.sleep(0.05)


def stun_rtts(edge: NetEdge, username: str, password: str, count: int) -> Summary:
    """Round trips of Binding requests through relay and transceiver, from the client host."""
    with edge.testbed.entered("client"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    samples: list[float | None] = []
    with sock:
        sock.settimeout(1.0)
        for _ in range(count):
            request = stun.binding_request(username, password, os.urandom(12))
            start = time.monotonic()
            sock.sendto(request, edge.relay)
            sample = None
            deadline = start + 1.0
            while time.monotonic() < deadline:  # skip the transceiver's own checks
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    break
                if data[:2] == b"\x01\x01" and data[8:20] == request[8:20]:
                    sample = time.monotonic() - start
                    break
            samples.append(sample)
            time.sleep(0.02)
    return summarise(samples)


def path_rtt(edge: NetEdge, count: int = 200) -> Summary:
    """UDP echo from the client host to the relay host's public address (no relay)."""
    with edge.testbed.entered("relay"):
        server_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server_sock.bind((edge.addresses.relay_public, ECHO_PORT))
    server = EchoServer(server_sock)
    try:
        with edge.testbed.entered("client"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            return summarise(
                probe(sock, (edge.addresses.relay_public, ECHO_PORT), count=count, interval_s=0.01)
            )
    finally:
        server.close()


async def relay_added(edge: NetEdge, count: int) -> tuple[Summary, Summary]:
    """(STUN through relay+transceiver, UDP echo to the relay host), during a live call."""
    figures: dict[str, Summary] = {}
    ready = asyncio.Event()

    async def during(pc: RTCPeerConnection, result: Any) -> None:
        username, password = calls.ice_credentials(pc, result)
        figures["stun"] = await asyncio.to_thread(stun_rtts, edge, username, password, count)
        ready.set()

    await calls.call_from_client(edge, during)
    return figures["stun"], path_rtt(edge)


def link_only(count: int) -> None:
    """The forwarder against a plain veth: added latency, and its packets-per-second limit."""
    text = (
        "host a\nhost b\nhost c\nhost d\n"
        "link a 10.77.0.1/24 b 10.77.0.2/24 impaired\nlink c 10.78.0.1/24 d 10.78.0.2/24\n"
    )
    with net.Testbed(layout.parse(text)) as bed:
        link = ImpairedLink(bed, 0)
        results = {}
        for name, src, dst, ip in (
            ("plain veth", "c", "d", "10.78.0.2"),
            ("impairment link", "a", "b", "10.77.0.2"),
        ):
            with bed.entered(dst):
                echo_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            echo_sock.bind((ip, ECHO_PORT))
            server = EchoServer(echo_sock)
            with bed.entered(src):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                results[name] = summarise(
                    probe(sock, (ip, ECHO_PORT), count=count, interval_s=0.005)
                )
            server.close()
            print(f"{name:16} {results[name].line()}")
        added = (results["impairment link"].rtt_median_ms - results["plain veth"].rtt_median_ms) / 2
        print(f"forwarder added one-way latency (median): {added:.3f} ms")
        # Throughput: 200-byte datagrams as fast as one sender can for 2 s.
        with bed.entered("b"):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("10.77.0.2", ECHO_PORT + 1))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sink.setblocking(False)
        with bed.entered("a"):
            blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        before = link.stats()
        payload = b"\0" * 200
        sent = received = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            for _ in range(64):
                try:
                    blaster.sendto(payload, ("10.77.0.2", ECHO_PORT + 1))
                    sent += 1
                except BlockingIOError:
                    break
            while True:
                try:
                    sink.recv(2048)
                    received += 1
                except BlockingIOError:
                    break
        after = link.stats()
        forwarded = after["sent"] - before["sent"]
        print(
            f"offered {sent / 2:.0f} pps, forwarded {forwarded / 2:.0f} pps, delivered "
            f"{received / 2:.0f} pps (200-byte datagrams, one sender)"
        )
        blaster.close()
        sink.close()


async def calls_run(args: argparse.Namespace) -> None:
    profile = Profile(
        delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=args.loss, burst=args.burst
    )
    workdir = Path(tempfile.mkdtemp(prefix="netsim-bench-"))
    flags = {"signaling": ["--demo-page", "true"]}
    with standard_edge(workdir, calls.API_KEY, up=profile, down=profile, extra_flags=flags) as edge:
        print(f"impairment each way: {json.dumps(asdict(profile))}")
        if args.chromium_rebind:
            chromium_rebind(edge, workdir, args.chromium_rebind)
            return
        base = path_rtt(edge)
        rtt = base.rtt_median_ms
        print(f"path RTT client -> relay host (UDP probe): {base.line()}")
        for index in range(args.calls):
            figures = await one_call(edge, args.seconds, args.rebind)
            line = {
                k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(figures).items()
            }
            print(f"call {index + 1}: {json.dumps(line)}")
            in_rtts = {
                "answer_to_connected": figures.answer_to_connected_ms / rtt,
                "first_audio_down_after_connected": figures.first_audio_down_after_connected_ms
                / rtt,
            }
            print(
                f"  in RTTs ({rtt:.1f} ms): "
                + json.dumps({k: round(v, 1) for k, v in in_rtts.items()})
            )
        if args.relay_probes:
            through, direct = await relay_added(edge, args.relay_probes)
            print(f"STUN via relay+transceiver: {through.line()}")
            print(f"UDP echo to relay host:     {direct.line()}")
            added = (through.rtt_median_ms - direct.rtt_median_ms) / 2
            print(f"relay path added one-way latency (median, upper bound): {added:.3f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-only", action="store_true")
    parser.add_argument("--probes", type=int, default=1000, help="--link-only probes")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each call")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="each way")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--burst", type=float, default=1.0)
    parser.add_argument("--rebind", action="store_true", help="rebind the NAT 2 s into each call")
    parser.add_argument("--relay-probes", type=int, default=200)
    parser.add_argument(
        "--chromium-rebind", type=int, default=0, help="N Chromium calls with a NAT rebinding"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("netsim needs root (network namespaces)", file=sys.stderr)
        return 1
    net.sweep()
    if args.link_only:
        link_only(args.probes)
    else:
        asyncio.run(calls_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
