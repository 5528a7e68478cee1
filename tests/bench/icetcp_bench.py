"""ICE-TCP figures, printed, never asserted (recorded in BENCHMARKS.md).

    ./bazelw run //tests/bench:icetcp -- --forwarding            # relay cost per packet
    ./bazelw run //tests/bench:icetcp -- --chromium 5            # set-up over TCP vs UDP
    ./bazelw run //tests/bench:icetcp -- --tcp-relay-restart 3   # TCP client, relay restart

`--forwarding`: one relay worker (its UDP data plane and its ICE-TCP plane, in a child
process so its CPU time is its own) between `--clients` call-like clients and a fake
transceiver that echoes every frame back. The same run sends the same packets over UDP and
over TCP (one RFC 4571 frame per write, round-robin over the clients, at `--pps` each way);
the figure is the relay process's CPU time per packet forwarded (both directions counted).

`--tcp-relay-restart N` (root): Chromium over TCP (UDP firewalled) mid-call; the relay
is SIGKILLed and started again with the same command line; prints how long until it is
ready and until audio flows to the page again (a TCP connection dies with the process; the
demo page restarts ICE by itself, web/demo/index.html).

`--chromium N` (needs root: tools/netsim): headless Chromium on the testbed's client host
calls N times over UDP and N times with the client's firewall dropping UDP (so over TCP to
port 443); per call, in the page: answer (setRemoteDescription) to ICE connected, and to the
first audio RTP packet received (getStats polled every 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SRTP = bytes([0x80, 0x6F]) + bytes(158)  # ~ a 20 ms Opus packet with its RTP header
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- forwarding cost -------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _relay_child(conn: multiprocessing.connection.Connection, media: tuple[str, int]) -> None:
    """The relay worker under test: DataPlane (UDP, batched I/O) with its TcpPlane."""
    import uvloop

    from libs.wire import ufrag
    from services.relay.dataplane import DataPlane
    from services.relay.router import Router
    from services.relay.store import MemoryBindingStore
    from services.relay.tcp import TcpLimits, TcpPlane
    from services.relay.topology import static_view

    async def serve() -> None:
        view = static_view([f"1/1={media[0]}:{media[1]}"])
        keyring = ufrag.dev_keyring()
        limits = TcpLimits(max_pending_per_ip=1000, max_open_per_ip=10_000)
        tcp = TcpPlane(
            Router(keyring, view, tcp=True), limits, listen="127.0.0.1:0", internal_host="127.0.0.1"
        )
        plane = DataPlane(
            Router(keyring, view),
            MemoryBindingStore(),
            udp_listen=("127.0.0.1:0",),
            internal_listen="127.0.0.1:0",
            binding_ttl_s=30.0,
            redis_max_inflight=1,
            tcp=tcp,
        )
        await plane.start()
        conn.send((plane.public_addresses[0], tcp.address, plane.batched))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await plane.close()

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as the relay binary runs
    asyncio.run(serve())


class _Echo(asyncio.DatagramProtocol):
    """The fake transceiver: every frame goes back to the relay socket it came from."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.frames = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.frames += 1
        if self.transport is not None:
            self.transport.sendto(data, addr)


class _Counter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1


class _TcpClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _paced(send_round: Any, clients: int, pps: int, seconds: float) -> int:
    """Calls send_round() (one packet per client) at `pps` packets/s; returns packets sent."""
    rounds = int(pps * seconds / clients)
    interval = clients / pps
    start = time.monotonic()
    for i in range(rounds):  # bounded
        send_round()
        delay = start + (i + 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    return rounds * clients


async def forwarding(clients: int, pps: int, seconds: float) -> None:
    from libs.wire import ufrag
    from services.relay.router import binding_request_for
    from services.relay.tcp import frame

    loop = asyncio.get_running_loop()
    echo = _Echo()
    sink, _ = await loop.create_datagram_endpoint(lambda: echo, local_addr=("127.0.0.1", 0))
    media = sink.get_extra_info("sockname")[:2]
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_relay_child, args=(child, media), daemon=True)
    process.start()
    try:
        udp_text, tcp_text, batched = await loop.run_in_executor(None, parent.recv)
        udp_vip, tcp_vip = _address(udp_text), _address(tcp_text)
        keyring = ufrag.dev_keyring()

        udp = []
        for _ in range(clients):
            transport, counter = await loop.create_datagram_endpoint(
                _Counter, local_addr=("127.0.0.1", 0)
            )
            transport.sendto(binding_request_for(keyring, 1, 1)[0], udp_vip)
            udp.append((transport, counter))
        tcp = []
        for _ in range(clients):
            _, client = await loop.create_connection(_TcpClient, *tcp_vip)
            assert client.transport is not None
            client.transport.write(frame(binding_request_for(keyring, 1, 1)[0]))
            tcp.append(client)
        await asyncio.sleep(0.5)  # every binding made (2 x clients requests, echoed)

        def udp_round() -> None:
            for transport, _ in udp:
                transport.sendto(SRTP, udp_vip)

        framed = frame(SRTP)

        def tcp_round() -> None:
            for client in tcp:
                assert client.transport is not None
                client.transport.write(framed)

        figures = {}
        for name, send_round in (("udp", udp_round), ("tcp", tcp_round)):
            for _, counter in udp:
                counter.received = 0
            for client in tcp:
                client.received = 0
            before_cpu, before_echo = _cpu_s(process.pid or 0), echo.frames
            sent = await _paced(send_round, clients, pps, seconds)
            await asyncio.sleep(0.3)  # the last echoes come back
            cpu = _cpu_s(process.pid or 0) - before_cpu
            forwarded = echo.frames - before_echo
            back = (
                sum(c.received for _, c in udp)
                if name == "udp"
                else sum(c.received for c in tcp) // len(framed)
            )
            figures[name] = (sent, forwarded, back, cpu)
        print(
            f"relay forwarding, one worker (UDP batched I/O: {batched}), {clients} clients, "
            f"{pps} pps each way, {seconds:.0f} s per transport, SRTP {len(SRTP)} B"
        )
        for name, (sent, forwarded, back, cpu) in figures.items():
            packets = forwarded + back
            per_packet_us = cpu / packets * 1e6 if packets else float("nan")
            print(
                f"  {name}: sent {sent}, reached the transceiver {forwarded}, came back "
                f"{back}; relay CPU {cpu:.2f} s = {per_packet_us:.1f} us per packet forwarded"
            )
        for transport, _ in udp:
            transport.close()
        for client in tcp:
            if client.transport is not None:
                client.transport.close()
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        await loop.run_in_executor(None, process.join, 10)
        if process.is_alive():
            process.kill()
        sink.close()


# ---- Chromium set-up time --------------------------------------------------------------

# Before the click: the page's peer connection records answer -> connected -> first RTP.
_TIMINGS = """
window.voiceedgeTimes = {};
const realSetRemote = RTCPeerConnection.prototype.setRemoteDescription;
RTCPeerConnection.prototype.setRemoteDescription = function (description) {
  const times = window.voiceedgeTimes;
  times.answer = performance.now();
  this.addEventListener("iceconnectionstatechange", () => {
    if (this.iceConnectionState === "connected" && !times.connected) {
      times.connected = performance.now();
    }
  });
  const timer = setInterval(() => {
    this.getStats().then((stats) => {
      stats.forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio" && s.packetsReceived > 0
            && !times.firstAudio) {
          times.firstAudio = performance.now();
          clearInterval(timer);
        }
      });
    });
  }, 10);
  return realSetRemote.call(this, description);
};
"""


def chromium_setup(calls_n: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.e2e.browser import chromium, js, write_tone_wav
    from tests.netsim.calls import API_KEY, KEY_INSTEAD_OF_SECRET, TONE_HZ
    from tools.netsim import nat
    from tools.netsim.edge import RELAY_TCP_PORT, standard_edge

    workdir = Path(tempfile.mkdtemp(prefix="icetcp-bench-"))
    flags = {"signaling": ["--demo-page", "true"]}
    results: dict[str, list[tuple[float, float]]] = {"udp": [], "tcp": []}
    with standard_edge(workdir, API_KEY, extra_flags=flags, relay_tcp_port=RELAY_TCP_PORT) as edge:
        wav = workdir / "tone.wav"
        write_tone_wav(wav, tone_s=1.0, silence_s=1.6, tone_hz=TONE_HZ)
        for index in range(calls_n * 2):
            transport = "tcp" if index % 2 else "udp"
            if transport == "tcp":
                nat.apply_firewall(edge.testbed, "client", "udp-dns-only")
            try:
                with (
                    edge.testbed.entered("client"),
                    chromium(workdir / f"c{index}", wav, secure_origin=edge.http_base) as browser,
                ):
                    browser.get(edge.http_base + "/")
                    browser.execute_script(KEY_INSTEAD_OF_SECRET + _TIMINGS)
                    browser.find_element(By.ID, "talk").click()
                    wait = WebDriverWait(browser, timeout=30, poll_frequency=0.05)
                    wait.until(lambda d: js(d, "window.voiceedgeTimes.firstAudio") is not None)
                    times = js(browser, "window.voiceedgeTimes")
                    browser.find_element(By.ID, "talk").click()
            finally:
                nat.remove_firewall(edge.testbed, "client")
            connected = times["connected"] - times["answer"]
            audio = times["firstAudio"] - times["answer"]
            results[transport].append((connected, audio))
            print(
                f"chromium call {index // 2 + 1} over {transport}: answer -> ICE connected "
                f"{connected:.0f} ms, -> first audio {audio:.0f} ms",
                flush=True,
            )
    for transport, rows in results.items():
        print(
            f"{transport}: median answer -> connected "
            f"{statistics.median(r[0] for r in rows):.0f} ms, -> first audio "
            f"{statistics.median(r[1] for r in rows):.0f} ms ({len(rows)} calls)"
        )


def _restart_relay(edge: Any) -> float:
    """SIGKILLs the relay (its workers exit with the pipe) and starts it again with the same
    command line; returns when the new one is ready (monotonic)."""
    old = edge.stack.services["relay"]
    old.process.kill()
    old.process.wait(timeout=10)
    edge.stack.restart("relay")
    return time.monotonic()


def tcp_relay_restart(calls_n: int) -> None:
    """Chromium over TCP (UDP firewalled); the relay is killed and restarted mid-call."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.e2e.browser import chromium, js, write_tone_wav
    from tests.netsim.calls import API_KEY, INBOUND_PACKETS, KEY_INSTEAD_OF_SECRET, TONE_HZ
    from tools.netsim import nat
    from tools.netsim.edge import RELAY_TCP_PORT, standard_edge

    inbound = f"(pc ? {INBOUND_PACKETS} : -1)"  # -1: no call (yet, or ended)
    workdir = Path(tempfile.mkdtemp(prefix="icetcp-restart-"))
    flags = {"signaling": ["--demo-page", "true"]}
    with standard_edge(workdir, API_KEY, extra_flags=flags, relay_tcp_port=RELAY_TCP_PORT) as edge:
        wav = workdir / "tone.wav"
        write_tone_wav(wav, tone_s=1.0, silence_s=1.6, tone_hz=TONE_HZ)
        nat.apply_firewall(edge.testbed, "client", "udp-dns-only")
        recovered: list[float] = []
        try:
            for index in range(calls_n):
                with (
                    edge.testbed.entered("client"),
                    chromium(workdir / f"r{index}", wav, secure_origin=edge.http_base) as browser,
                ):
                    browser.get(edge.http_base + "/")
                    browser.execute_script(KEY_INSTEAD_OF_SECRET)
                    browser.find_element(By.ID, "talk").click()
                    wait = WebDriverWait(browser, timeout=30, poll_frequency=0.05)
                    wait.until(lambda d: js(d, inbound) > 50)
                    killed = time.monotonic()
                    with edge.testbed.entered("cluster"):
                        ready = _restart_relay(edge)
                    before = js(browser, inbound)
                    resumed = float("nan")
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:  # bounded: 60 s of polls
                        if js(browser, inbound) > before + 5:
                            resumed = time.monotonic()
                            break
                        time.sleep(0.02)
                    state = js(browser, "pc ? pc.iceConnectionState : 'call ended'")
                    restarts = js(browser, "window.voiceedgeIceRestarts.count")
                    recovered.append(resumed - killed)
                    print(
                        f"relay restart {index + 1}: relay ready again "
                        f"{(ready - killed) * 1000:.0f} ms after the kill; audio resumed "
                        f"{(resumed - killed) * 1000:.0f} ms after the kill (ICE {state}, "
                        f"{restarts} ICE restart(s) by the page)",
                        flush=True,
                    )
                    if js(browser, "pc !== null"):
                        browser.find_element(By.ID, "talk").click()
        finally:
            nat.remove_firewall(edge.testbed, "client")
    if recovered:
        ms = sorted(r * 1000 for r in recovered)
        print(
            f"relay kill -> audio back over TCP: min {ms[0]:.0f} / median "
            f"{statistics.median(ms):.0f} / max {ms[-1]:.0f} ms ({len(ms)} restarts)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forwarding", action="store_true", help="relay cost per packet")
    parser.add_argument("--clients", type=int, default=200, help="clients per transport")
    parser.add_argument("--pps", type=int, default=5000, help="packets/s each way")
    parser.add_argument("--seconds", type=float, default=10.0, help="per transport")
    parser.add_argument("--chromium", type=int, default=0, help="N Chromium calls each way")
    parser.add_argument(
        "--tcp-relay-restart", type=int, default=0, help="N TCP calls whose relay restarts"
    )
    args = parser.parse_args(argv)
    if not (args.forwarding or args.chromium or args.tcp_relay_restart):
        parser.error("ask for --forwarding, --chromium N and/or --tcp-relay-restart N")
    if args.forwarding:
        asyncio.run(forwarding(args.clients, args.pps, args.seconds))
    if args.chromium:
        chromium_setup(args.chromium)
    if args.tcp_relay_restart:
        tcp_relay_restart(args.tcp_relay_restart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
