"""Headless Chromium on the client host calls over WHIP (RFC 9725), then the host's address
changes under it: the page calls restartIce(), PATCHes the WHIP session URL with its new
ICE credentials (RFC 8840 sdpfrag, If-Match "*"), and media resumes on the same session:
same call id on the data channel, at the transceiver and at the bridge. The old ETag is
stale afterwards (412). And an aiortc caller whose access link passes nothing for 20 s
(the transceiver's consent expires meanwhile) restarts ICE with a PATCH on its OpenAI-style
call URL and keeps its session.

The page is the demo page's origin (a secure one for the microphone, as chromium_test.py
has it) running the WHIP client below; the test's thread sits in the client's namespace.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from selenium.webdriver.support.ui import WebDriverWait

from examples.python_client.client import CallResult
from services.transceiver import aiortc_compat
from tests.e2e.browser import js
from tests.netsim import calls, pages
from tests.netsim.calls import API_KEY
from tools.netsim import nat
from tools.netsim.edge import NetEdge, standard_edge
from voiceedge.transceiver.v1 import transceiver_pb2

NEW_CLIENT_ADDRESS = "10.10.0.3/24"
NAT_INSIDE = "10.10.0.1"
SERVICES_LOG: dict[str, Path] = {}

# The demo page's own functions do the rest: localOffer (an offer and its whole gathering),
# sdpAttribute, and iceRestart (restartIce(), the PATCH, the answer set again), the code
# the page itself runs when its ICE fails.
HELPERS = """
window.sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
window.inbound = async (pc) => {
  let received = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") received = s.packetsReceived;
  });
  return received;
};
// Chromium learns of a new address from the kernel on its own schedule (about 2 s here);
// until then it gathers nothing. An application restarts ICE when it sees the network
// change; here: once a throwaway peer connection gathers a host candidate again.
window.networkBack = async () => {
  for (let i = 0; i < 100; i++) {
    const probe = new RTCPeerConnection({ iceServers: [] });
    probe.createDataChannel("probe");
    await localOffer(probe);
    const found = probe.localDescription.sdp
      .split("\\r\\n")
      .filter((l) => l.startsWith("a=candidate:") && !/ (127\\.0\\.0\\.1|::1) /.test(l));
    probe.close();
    if (found.length) return found;
    await sleep(50);
  }
  return false;
};
"""

# POST /whip: the page's own peer connection, the microphone and the oai-events channel.
START = (
    HELPERS
    + """
const done = arguments[arguments.length - 1];
(async () => {
  const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
  const pc = new RTCPeerConnection({ iceServers: [] });
  const whip = (window.whip = { pc, events: [], key: arguments[0] });
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  whip.dc = pc.createDataChannel("oai-events");
  whip.dc.onmessage = (m) => whip.events.push(JSON.parse(m.data));
  await localOffer(pc);
  const response = await fetch("/whip", {
    method: "POST",
    headers: { Authorization: `Bearer ${whip.key}`, "Content-Type": "application/sdp" },
    body: pc.localDescription.sdp,
  });
  whip.answer = await response.text();
  if (response.status !== 201) return done({ status: response.status, body: whip.answer });
  whip.url = response.headers.get("Location");
  whip.etag = response.headers.get("ETag");
  await pc.setRemoteDescription({ type: "answer", sdp: whip.answer });
  done({ status: 201, url: whip.url, etag: whip.etag });
})().catch((e) => done({ error: String(e) }));
"""
)

# restartIce() and the PATCH (RFC 9725 §4.3.2); then when inbound audio flows again.
RESTART = (
    HELPERS
    + """
const done = arguments[arguments.length - 1];
(async () => {
  const whip = window.whip;
  const pc = whip.pc;
  const moved = performance.now();
  const seen = await networkBack();
  if (!seen) return done({ error: "Chromium saw no network after the move" });
  const networkMs = performance.now() - moved;
  const before = await inbound(pc);
  const restart = await iceRestart(pc, whip.url, whip.key, whip.answer);
  const { body, frag, sentAt: sent } = restart;
  if (restart.status !== 200) return done({ status: restart.status, body });
  whip.answer = restart.answer;
  const ufrag = sdpAttribute(body, "ice-ufrag");
  const base = await inbound(pc);
  let resumed = null;
  for (let i = 0; i < 1000 && resumed === null; i++) {
    if ((await inbound(pc)) > base) resumed = performance.now();
    else await sleep(5);
  }
  const oldEtag = whip.etag;
  whip.etag = restart.etag;
  done({
    status: 200, body, before, base, oldEtag, etag: whip.etag, ufrag, frag,
    networkMs, seen, patchMs: restart.answeredAt - sent, appliedMs: restart.appliedAt - sent,
    resumedMs: resumed === null ? null : resumed - sent,
  });
})().catch((e) => done({ error: String(e) }));
"""
)

STALE = """
const done = arguments[arguments.length - 1];
fetch(window.whip.url, {
  method: "PATCH",
  headers: {
    Authorization: `Bearer ${window.whip.key}`,
    "Content-Type": "application/trickle-ice-sdpfrag",
    "If-Match": arguments[0],
  },
  body: "a=end-of-candidates\\r\\n",
}).then(async (r) => done({ status: r.status, body: await r.json() }),
        (e) => done({ error: String(e) }));
"""


HANG_UP = """
const done = arguments[arguments.length - 1];
fetch(window.whip.url, {
  method: "DELETE", headers: { Authorization: `Bearer ${window.whip.key}` },
}).then((r) => done(r.status), (e) => done(String(e)));
"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetEdge]:
    flags = {
        "signaling": ["--demo-page", "true"],
        # Consent expires 3 s into a silence, so the 20 s vanish below is waited out in
        # the reconnect grace (30 s, the default).
        "transceiver": ["--consent-interval-s", "1", "--consent-expiry-s", "3"],
    }
    workdir = tmp_path_factory.mktemp("netsim")
    SERVICES_LOG["path"] = workdir / "services.log"
    with standard_edge(workdir, API_KEY, extra_flags=flags) as running:
        yield running


def move_client(edge: NetEdge) -> None:
    """The client host's address changes (a new DHCP lease, another network behind the
    same router): the new address first, then the old one goes, the route stays."""
    device = edge.testbed.ifname("client", "nat")
    run = edge.testbed.run_in
    run("client", ["sysctl", "-q", "-w", f"net.ipv4.conf.{device}.promote_secondaries=1"])
    run("client", ["ip", "addr", "add", NEW_CLIENT_ADDRESS, "dev", device])
    run("client", ["ip", "addr", "del", f"{edge.addresses.client}/24", "dev", device])
    run("client", ["ip", "route", "replace", "default", "via", NAT_INSIDE])


def session_events(browser: Any, kind: str) -> list[dict[str, Any]]:
    events = js(browser, "JSON.stringify(window.whip.events)")
    return [e for e in json.loads(events) if e.get("type") == kind]


def test_chromium_restarts_ice_after_its_address_changes_and_keeps_the_session(
    edge: NetEdge, tmp_path: Path
) -> None:
    with pages.chromium_on_client(edge, tmp_path) as browser:
        browser.set_script_timeout(30)
        browser.get(edge.http_base + "/")
        started = browser.execute_async_script(START, API_KEY)
        assert started.get("status") == 201, started
        call_id = started["url"].rsplit("/", 1)[1]
        wait = WebDriverWait(browser, timeout=30, poll_frequency=0.2)
        wait.until(lambda d: js(d, "window.whip.pc.connectionState") == "connected")
        wait.until(lambda d: session_events(d, "session.created"))
        (created,) = session_events(browser, "session.created")
        assert created["session"]["id"] == f"sess_{call_id}"
        wait.until(lambda d: js(d, "window.whip.dc.readyState") == "open")
        with edge.testbed.entered("cluster"):
            before = calls.live_session(edge)
        assert before.session_id == call_id
        assert started["etag"] == f'"{before.ice_ufrag}"'

        move_client(edge)
        restarted = browser.execute_async_script(RESTART)
        assert restarted.get("status") == 200, restarted
        assert "10.10.0.3" in restarted["frag"], (restarted["frag"], restarted["seen"])
        print(
            f"ICE restart: Chromium saw its new address after {restarted['networkMs']:.0f} ms; "
            f"PATCH answered in {restarted['patchMs']:.0f} ms, answer applied "
            f"at {restarted['appliedMs']:.0f} ms, first audio packet again at "
            f"{restarted['resumedMs']} ms after the PATCH was sent"
        )
        assert restarted["resumedMs"] is not None, restarted
        assert restarted["etag"] != started["etag"]

        # Media flows both ways again, on the same session, from the new address.
        slow = WebDriverWait(browser, timeout=45, poll_frequency=0.25)
        down_at = js(browser, calls.INBOUND_PACKETS.replace("pc.", "window.whip.pc."))
        slow.until(
            lambda d: js(d, calls.INBOUND_PACKETS.replace("pc.", "window.whip.pc.")) > down_at + 50
        )
        with edge.testbed.entered("cluster"):
            after = calls.live_session(edge)
        assert after.session_id == call_id
        assert after.ice_ufrag == restarted["ufrag"] != before.ice_ufrag
        assert after.stats.selected_remote_address.ip == edge.addresses.nat_public

        def up_flows(_: object) -> bool:
            with edge.testbed.entered("cluster"):
                now = calls.live_session(edge)
            return bool(now.stats.packets_received > after.stats.packets_received + 50)

        slow.until(up_flows)

        # The data channel survived: a session.update is answered for the same session.
        browser.execute_script(
            "window.whip.dc.send(JSON.stringify("
            "{type: 'session.update', session: {instructions: 'moved'}}))"
        )
        wait.until(lambda d: session_events(d, "session.updated"))
        (updated,) = session_events(browser, "session.updated")
        assert updated["session"]["id"] == f"sess_{call_id}"
        assert updated["session"]["instructions"] == "moved"
        assert len(session_events(browser, "session.created")) == 1

        # The old ETag names an ICE session that is gone.
        stale = browser.execute_async_script(STALE, started["etag"])
        assert stale["status"] == 412, stale
        assert stale["body"]["error"]["code"] == "ice_session_changed"
        assert js(browser, "window.whip.pc.connectionState") == "connected"
        # The bridge saw one session for the call, opened once and still open.
        log = SERVICES_LOG["path"].read_text(errors="replace")
        opened = [line for line in log.splitlines() if "bridge.session_open" in line]
        assert sum(call_id in line for line in opened) == 1, opened
        closed = [line for line in log.splitlines() if "bridge.session_closed" in line]
        assert not any(call_id in line for line in closed), closed
        hung_up = browser.execute_async_script(HANG_UP)
        assert hung_up == 204, hung_up


VANISH_S = 20.0
# The caller vanishes: its host drops every UDP datagram in and out (HTTP still works).
VANISH_TABLE = "icerestart_vanish"
VANISH_RULES = f"""table inet {VANISH_TABLE} {{
  chain out {{ type filter hook output priority filter; policy accept; meta l4proto udp drop; }}
  chain in {{ type filter hook input priority filter; policy accept; meta l4proto udp drop; }}
}}
"""


def vanish(edge: NetEdge) -> None:
    nat.apply_ruleset(edge.testbed.ns("client"), VANISH_RULES)


def come_back(edge: NetEdge) -> None:
    edge.testbed.run_in("client", ["nft", "delete", "table", "inet", VANISH_TABLE])


def session_of(edge: NetEdge, call_id: str) -> Any:
    (found,) = [s for s in calls.sessions(edge) if s.session_id == call_id]
    return found


async def wait_state(edge: NetEdge, call_id: str, state: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while session_of(edge, call_id).state != state:
        assert time.monotonic() < deadline, f"session never reached state {state}"
        await asyncio.sleep(0.25)


async def restart_over_call_url(
    edge: NetEdge, pc: RTCPeerConnection, result: CallResult
) -> tuple[int, str]:
    """The client's side of an ICE restart (aiortc has no restartIce): new credentials of
    its own in a PATCH of the call URL, the server's new ones from the answer."""
    ufrag, pwd = secrets.token_hex(4), secrets.token_hex(12)
    frag = f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/trickle-ice-sdpfrag",
        "If-Match": "*",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.patch(edge.http_base + result.call_url, data=frag, headers=headers) as response,
    ):
        body = await response.text()
        if response.status != 200:
            return response.status, body
    server_ufrag = calls.sdp_attribute(body, "ice-ufrag")
    server_pwd = calls.sdp_attribute(body, "ice-pwd")
    (transport,) = aiortc_compat.ice_transports(pc)
    credentials = aiortc_compat.IceCredentials(ufrag, pwd, server_ufrag, server_pwd)
    aiortc_compat.restart_client_ice(aiortc_compat.connection_of(transport), credentials)
    return 200, server_ufrag


@pytest.mark.timeout_s(150)
async def test_an_aiortc_caller_gone_for_20s_restarts_over_the_call_url(edge: NetEdge) -> None:
    seen: dict[str, Any] = {}

    async def during(pc: RTCPeerConnection, result: CallResult) -> None:
        assert await result.wait_event("session.created", 10)
        call_id = result.call_url.rsplit("/", 1)[1]
        before = session_of(edge, call_id)
        assert before.state == transceiver_pb2.SESSION_STATE_CONNECTED
        vanish(edge)
        vanished = time.monotonic()
        try:
            await wait_state(edge, call_id, transceiver_pb2.SESSION_STATE_CONNECTING, 15)
            seen["silent_after_s"] = time.monotonic() - vanished
            await asyncio.sleep(max(0.0, VANISH_S - (time.monotonic() - vanished)))
            assert session_of(edge, call_id).state == transceiver_pb2.SESSION_STATE_CONNECTING
        finally:
            come_back(edge)
        patched = time.monotonic()
        status, server_ufrag = await restart_over_call_url(edge, pc, result)
        assert status == 200, server_ufrag
        await wait_state(edge, call_id, transceiver_pb2.SESSION_STATE_CONNECTED, 15)
        seen["connected_after_s"] = time.monotonic() - patched
        arrived = len(result.arrivals)
        deadline = time.monotonic() + 15
        while len(result.arrivals) < arrived + 50:
            assert time.monotonic() < deadline, "no audio after the restart"
            await asyncio.sleep(0.1)
        after = session_of(edge, call_id)
        seen.update(before=before, after=after, server_ufrag=server_ufrag)
        assert after.stats.packets_received > before.stats.packets_received

    result = await calls.call_from_client(edge, during, connect_timeout_s=20)
    assert result.connected, result.error_body
    before, after = seen["before"], seen["after"]
    assert after.session_id == before.session_id == result.call_url.rsplit("/", 1)[1]
    assert after.ice_ufrag == seen["server_ufrag"] != before.ice_ufrag
    assert result.event_types().count("session.created") == 1
    print(
        f"aiortc caller silent {VANISH_S:.0f} s: consent expired after "
        f"{seen['silent_after_s']:.1f} s; PATCH -> session connected again "
        f"{seen['connected_after_s'] * 1000:.0f} ms (polled every 250 ms)"
    )
