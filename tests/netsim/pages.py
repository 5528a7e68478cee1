"""The demo page driven in headless Chromium from the client host: what the browser tests
across hosts share (tests/netsim/chromium_test.py, icetcp_test.py)."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.browser import chromium, js, write_tone_wav
from tests.netsim.calls import KEY_INSTEAD_OF_SECRET, TONE_HZ
from tools.netsim.edge import NetEdge

PAGE_TEXT = (
    "document.getElementById('state').textContent + ' ice=' + "
    "document.getElementById('ice').textContent + ' events: ' + "
    "document.getElementById('events').textContent"
)


@contextlib.contextmanager
def chromium_on_client(edge: NetEdge, workdir: Path) -> Iterator[webdriver.Chrome]:
    """Chromium whose microphone loops a 1 s tone and 1.6 s of silence, with the signaling
    origin treated as secure; the calling thread sits in the client's namespace meanwhile,
    so chromedriver, Chromium and selenium's connection to it all live there."""
    wav = workdir / "tone.wav"
    write_tone_wav(wav, tone_s=1.0, silence_s=1.6, tone_hz=TONE_HZ)
    with (
        edge.testbed.entered("client"),
        chromium(workdir, wav, secure_origin=edge.http_base) as browser,
    ):
        yield browser


def start_call(browser: webdriver.Chrome, edge: NetEdge, timeout_s: float = 30) -> str:
    """Opens the demo page, presses Talk and asserts the call connects; returns what the
    page shows (state, ICE state, events) for later assert messages."""
    browser.get(edge.http_base + "/")
    browser.execute_script(KEY_INSTEAD_OF_SECRET)
    browser.find_element(By.ID, "talk").click()
    wait = WebDriverWait(browser, timeout=timeout_s, poll_frequency=0.2)
    with contextlib.suppress(TimeoutException):  # the assert below says what it saw
        wait.until(lambda d: js(d, "window.voiceedgeState") in ("connected", "failed"))
    page = str(js(browser, PAGE_TEXT))
    assert js(browser, "window.voiceedgeState") == "connected", page
    return page


def hears_the_tone(browser: webdriver.Chrome) -> None:
    """Waits for 8 loud 100 ms windows of returned audio; asserts their pitch is the tone."""
    slow = WebDriverWait(browser, timeout=45, poll_frequency=0.25)
    slow.until(
        lambda d: (
            (js(d, "window.voiceedgeReceived && window.voiceedgeReceived.loudWindows") or 0) >= 8
        )
    )
    heard = statistics.median(js(browser, "window.voiceedgeReceived.peaksHz"))
    assert abs(heard - TONE_HZ) < TONE_HZ * 0.05, heard
