"""Headless Chromium (fake microphone) behind the NAT calls the edge on its own hosts,
through the demo page signaling serves on its public address; then the NAT rebinds and the
call follows.

The demo page mints client secrets for loopback peers only, and Chromium here is not one:
the test replaces that one fetch in the page with the API key, and everything else is the
page as users get it. The test's thread sits in the client's namespace throughout, so
chromedriver, Chromium and selenium's connection to chromedriver all live there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.browser import js
from tests.netsim import calls, pages
from tests.netsim.calls import API_KEY, INBOUND_PACKETS
from tools.netsim.edge import NetEdge, standard_edge


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetEdge]:
    flags = {"signaling": ["--demo-page", "true"]}
    with standard_edge(tmp_path_factory.mktemp("netsim"), API_KEY, extra_flags=flags) as running:
        yield running


def test_chromium_behind_nat_calls_through_the_relay_and_hears_the_tone(
    edge: NetEdge, tmp_path: Path
) -> None:
    with pages.chromium_on_client(edge, tmp_path) as browser:
        pages.start_call(browser, edge)
        wait = WebDriverWait(browser, timeout=30, poll_frequency=0.2)
        relay = f"{edge.relay[0]}:{edge.relay[1]}"
        wait.until(lambda d: js(d, "window.voiceedgeRemote") == relay)
        with edge.testbed.entered("cluster"):
            selected = calls.live_session(edge).stats.selected_remote_address
        assert selected.ip == edge.addresses.nat_public  # the NAT, never the client

        pages.hears_the_tone(browser)
        slow = WebDriverWait(browser, timeout=45, poll_frequency=0.25)

        # The NAT rebinds mid-call: Chromium's next check comes from a new public port,
        # the call follows it both ways with the same session and no renegotiation.
        with edge.testbed.entered("cluster"):
            before = calls.live_session(edge)
        edge.nat.rebind()

        def moved(_: object) -> bool:
            with edge.testbed.entered("cluster"):
                now = calls.live_session(edge)
            return now.stats.selected_remote_address.port not in (
                0,
                before.stats.selected_remote_address.port,
            )

        slow.until(moved)
        with edge.testbed.entered("cluster"):
            after = calls.live_session(edge)
        assert after.session_id == before.session_id
        assert after.ice_ufrag == before.ice_ufrag
        down_at = js(browser, INBOUND_PACKETS)
        slow.until(lambda d: js(d, INBOUND_PACKETS) > down_at + 50)

        def up_flows(_: object) -> bool:
            with edge.testbed.entered("cluster"):
                now = calls.live_session(edge)
            return bool(now.stats.packets_received > after.stats.packets_received + 50)

        slow.until(up_flows)
        assert js(browser, "window.voiceedgeState") == "connected"
        browser.find_element(By.ID, "talk").click()  # hang up
        wait.until(lambda d: js(d, "document.getElementById('state').textContent") == "idle")
