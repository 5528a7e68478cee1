"""ICE-TCP across hosts: the relay also listens on its public TCP port 443 and answers carry
it as a tcptype passive candidate. Headless Chromium on the client host (behind the NAT)
keeps UDP while UDP works; with the client's firewall dropping all UDP but DNS it connects
over TCP to the relay and hears the tone. 1000 idle TCP connects from the client host stay
within the per-IP pending cap, cost the relay little memory, and a call through it keeps
its audio meanwhile. A relay kill -9 under a TCP call ends its connection: the demo page
restarts ICE by itself (a PATCH of its call URL) and the tone comes back over TCP on the
same call; the time from the kill to audio back is printed (BENCHMARKS.md).

The tests run in file order on one edge: the firewall tests are last (it is removed after),
the relay restart the very last.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCPeerConnection
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from examples.python_client.client import CallResult, ToneTrack, dominant_frequency
from tests.e2e.browser import chromium, js, write_tone_wav
from tests.netsim import calls, pages
from tests.netsim.calls import API_KEY, TONE_HZ
from tools.netsim import nat
from tools.netsim.edge import ADDR, RELAY_TCP_PORT, NetEdge, standard_edge

METRICS_PORT = 9464
PENDING_PER_IP = 8  # the relay's tcp_max_pending_per_ip default (per worker)
IDLE_CONNECTS = 1000

# The page's own peer connection (a top-level `let`): the selected pair's two candidates.
SELECTED_PAIR = """const done = arguments[arguments.length - 1];
pc.getStats().then((stats) => {
  let pair = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      pair = stats.get(s.selectedCandidatePairId);
    }
  });
  if (!pair) { done(null); return; }
  const local = stats.get(pair.localCandidateId);
  const remote = stats.get(pair.remoteCandidateId);
  done({
    localProtocol: local.protocol, remoteProtocol: remote.protocol,
    remote: `${remote.address}:${remote.port}`, tcpType: remote.tcpType || "",
  });
});"""

# In the page: packetsReceived of its audio sampled every 10 ms from the kill on (the
# caller stores `killedAt` right before it); `back` is when a packet first arrives after
# the connection died (the baseline is taken 300 ms after the kill, when nothing from
# before it can still be in flight).
WATCH_AUDIO_BACK = """window.audioBack = { killedAt: performance.now(), back: null };
(async () => {
  const watch = window.audioBack;
  let base = null;
  for (let i = 0; i < 6000 && watch.back === null; i++) {  // 60 s at most
    let received = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") received = s.packetsReceived;
    });
    const now = performance.now();
    if (base === null && now - watch.killedAt >= 300) base = received;
    else if (base !== null && received > base) watch.back = now;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
})();"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetEdge]:
    flags = {
        "signaling": ["--demo-page", "true"],
        "relay": ["--metrics-listen", f"{ADDR.relay_internal}:{METRICS_PORT}"],
    }
    with standard_edge(
        tmp_path_factory.mktemp("netsim"), API_KEY, extra_flags=flags, relay_tcp_port=RELAY_TCP_PORT
    ) as running:
        try:
            yield running
        finally:
            nat.remove_firewall(running.testbed, "client")


def relay_metric(edge: NetEdge, name: str, labels: str = "") -> float:
    """One sample of the relay's Prometheus /metrics (0 when absent)."""
    with edge.testbed.entered("relay"):
        url = f"http://{ADDR.relay_internal}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def relay_rss_kib(edge: NetEdge) -> int:
    """Resident memory of the relay process and its worker processes."""
    root = edge.stack.services["relay"].process.pid
    pids = [root]
    for task in Path(f"/proc/{root}/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(p) for p in children]
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def chromium_call(edge: NetEdge, tmp_path: Path) -> dict[str, Any]:
    """Chromium on the client host calls through the demo page, waits for the tone back;
    returns the selected pair as getStats sees it."""
    wav = tmp_path / "tone.wav"
    write_tone_wav(wav, tone_s=1.0, silence_s=1.6, tone_hz=TONE_HZ)
    with (
        edge.testbed.entered("client"),
        chromium(tmp_path, wav, secure_origin=edge.http_base) as browser,
    ):
        page = pages.start_call(browser, edge, timeout_s=40)
        wait = WebDriverWait(browser, timeout=40, poll_frequency=0.2)
        pair = None
        with contextlib.suppress(TimeoutException):
            wait.until(lambda d: d.execute_async_script(SELECTED_PAIR) is not None)
            pair = browser.execute_async_script(SELECTED_PAIR)
        assert pair is not None, page
        print(f"selected pair (Chromium getStats): {pair}")
        pages.hears_the_tone(browser)
        browser.find_element(By.ID, "talk").click()  # hang up
        wait.until(lambda d: js(d, "document.getElementById('state').textContent") == "idle")
        return dict(pair)


@pytest.mark.timeout_s(150)
def test_chromium_with_udp_still_selects_udp(edge: NetEdge, tmp_path: Path) -> None:
    pair = chromium_call(edge, tmp_path)
    assert (pair["localProtocol"], pair["remoteProtocol"]) == ("udp", "udp"), pair
    assert pair["remote"] == f"{edge.relay[0]}:{edge.relay[1]}"


@pytest.mark.timeout_s(180)
async def test_a_thousand_idle_connects_stay_capped_and_a_call_keeps_its_audio(
    edge: NetEdge,
) -> None:
    # One socket per connect, beside the call's and Chromium's: lift the soft fd limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workers = int(edge.stack.services["relay"].ready["workers"])
    cap = PENDING_PER_IP * workers  # per worker; the kernel spreads connections over them
    refused_before = relay_metric(
        edge, "voiceedge_relay_tcp_closed_total", 'reason="pending_cap_ip"'
    )
    rss_before = relay_rss_kib(edge)
    seen: dict[str, float] = {}
    track = ToneTrack(frequency_hz=TONE_HZ)

    async def connect_many(pc: RTCPeerConnection, result: CallResult) -> None:
        seen["pending_max"] = await asyncio.to_thread(idle_connects, edge, cap, seen)
        seen["rss_after"] = relay_rss_kib(edge)
        await asyncio.sleep(1.2)  # the utterance goes on (the track is paced in real time)
        track.silent = True
        assert await result.wait_event("response.done", timeout_s=20), result.event_types()

    result = await calls.call_from_client(edge, connect_many, track=track)
    assert result.status == 201, result.error_body
    audio = result.audio()
    heard = dominant_frequency(audio[-result.received_rate * 2 :], result.received_rate)
    assert abs(heard - TONE_HZ) < TONE_HZ * 0.05, heard
    assert seen["pending_max"] <= cap, seen
    refused = (
        relay_metric(edge, "voiceedge_relay_tcp_closed_total", 'reason="pending_cap_ip"')
        - refused_before
    )
    assert refused >= IDLE_CONNECTS - seen["accepted_max"], (refused, seen)
    grown_kib = max(seen["rss_during"], seen["rss_after"]) - rss_before
    print(
        f"relay RSS {rss_before} KiB, {seen['rss_during']:.0f} KiB with the connects held, "
        f"{seen['rss_after']:.0f} KiB after; {refused:.0f} refused at the per-IP pending cap, "
        f"at most {seen['pending_max']:.0f} held (cap {cap})"
    )
    assert grown_kib < 5 * 1024, grown_kib


def idle_connects(edge: NetEdge, cap: int, seen: dict[str, float]) -> float:
    """Opens IDLE_CONNECTS TCP connections to the relay from the client host, sends
    nothing; returns the most that were still held open by the relay at once (each
    refused one is closed at once, each pending one after the first-frame timeout)."""
    with edge.testbed.entered("client"):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(IDLE_CONNECTS)]
    target = (ADDR.relay_public, RELAY_TCP_PORT)
    try:
        for sock in socks:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(target)
        # A socket the relay closed becomes readable (EOF or reset); the others stay quiet
        # until the 2 s first-frame timeout. Count the open ones once the refusals are in.
        deadline = time.monotonic() + 1.5
        open_now = len(socks)
        while time.monotonic() < deadline:  # bounded: 1.5 s of 50 ms turns
            open_now = sum(1 for s in socks if _held(s))
            if open_now <= cap:
                break
            time.sleep(0.05)
        seen["accepted_max"] = open_now
        seen["rss_during"] = relay_rss_kib(edge)  # the refusals in, the pending ones held
        final_deadline = time.monotonic() + 10.0
        while time.monotonic() < final_deadline and any(_held(s) for s in socks):
            time.sleep(0.1)  # every pending one is closed by the first-frame timeout
        assert not any(_held(s) for s in socks), "the relay kept idle connections open"
        return float(open_now)
    finally:
        for sock in socks:
            sock.close()


def _held(sock: socket.socket) -> bool:
    """True while the relay keeps the connection open (not yet EOF or reset)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # connected (or connecting), nothing to read: still open
    except OSError:
        return False  # reset, or never connected
    return bool(data)  # b"": the relay closed it


@pytest.mark.timeout_s(150)
def test_chromium_with_udp_blocked_connects_over_tcp(edge: NetEdge, tmp_path: Path) -> None:
    nat.apply_firewall(edge.testbed, "client", "udp-dns-only")
    try:
        pair = chromium_call(edge, tmp_path)
    finally:
        nat.remove_firewall(edge.testbed, "client")
    assert (pair["localProtocol"], pair["remoteProtocol"]) == ("tcp", "tcp"), pair
    assert pair["remote"] == f"{ADDR.relay_public}:{RELAY_TCP_PORT}"
    assert pair["tcpType"] == "passive"
    assert (
        relay_metric(edge, "voiceedge_relay_tcp_frames_total", 'direction="transceiver_to_client"')
        > 0
    )


def selected_pair(browser: Any, timeout_s: float = 40) -> dict[str, Any]:
    wait = WebDriverWait(browser, timeout=timeout_s, poll_frequency=0.2)
    wait.until(lambda d: d.execute_async_script(SELECTED_PAIR) is not None)
    return dict(browser.execute_async_script(SELECTED_PAIR))


@pytest.mark.timeout_s(150)
def test_chromium_over_tcp_restarts_ice_after_a_relay_kill_9(edge: NetEdge, tmp_path: Path) -> None:
    nat.apply_firewall(edge.testbed, "client", "udp-dns-only")
    try:
        with pages.chromium_on_client(edge, tmp_path) as browser:
            pages.start_call(browser, edge, timeout_s=40)
            assert selected_pair(browser)["remoteProtocol"] == "tcp"
            pages.hears_the_tone(browser)
            call_url = js(browser, "callUrl")
            with edge.testbed.entered("cluster"):
                before = calls.live_session(edge)

            browser.execute_script(WATCH_AUDIO_BACK)
            edge.stack.kill("relay")  # kill -9: the TCP connection dies with the process
            edge.stack.start_again("relay")
            wait = WebDriverWait(browser, timeout=45, poll_frequency=0.1)
            with contextlib.suppress(TimeoutException):  # the assert says what it saw
                wait.until(lambda d: js(d, "window.audioBack.back") is not None)
            restarts = js(browser, "window.voiceedgeIceRestarts")
            page = str(js(browser, pages.PAGE_TEXT))
            watch = js(browser, "window.audioBack")
            assert watch["back"] is not None, (restarts, page)
            last, killed = restarts["last"], watch["killedAt"]
            print(
                f"relay kill -9 under a Chromium TCP call: ICE no longer connected "
                f"{restarts['downAt'] - killed:.0f} ms after the kill, the ICE restart PATCH sent "
                f"{last['sentAt'] - killed:.0f} ms after the kill (restart "
                f"{restarts['count']}), answered in {last['answeredAt'] - last['sentAt']:.0f} ms; "
                f"audio back {watch['back'] - killed:.0f} ms after the kill"
            )
            assert restarts["count"] >= 1, restarts
            assert last["status"] == 200, restarts

            # The tone again, over TCP, on the same call.
            js(browser, "window.voiceedgeReceived.loudWindows = 0")
            js(browser, "window.voiceedgeReceived.peaksHz = []")
            pages.hears_the_tone(browser)
            pair = selected_pair(browser)
            assert (pair["localProtocol"], pair["remoteProtocol"]) == ("tcp", "tcp"), pair
            assert js(browser, "callUrl") == call_url
            with edge.testbed.entered("cluster"):
                after = calls.live_session(edge)
            assert after.session_id == before.session_id
            assert after.ice_ufrag != before.ice_ufrag  # a new ICE session, the same call
    finally:
        nat.remove_firewall(edge.testbed, "client")
