"""A real browser through the whole edge: headless Debian Chromium, a fake microphone
playing a known WAV, the demo page served by signaling.

The WAV is a 440 Hz tone for 1 s, then 1.6 s of silence, looped by Chromium. The echo agent
answers each tone after its end-of-turn silence; the next tone starts while that answer is
still playing, which is a barge-in. The page itself measures what it hears (an
AnalyserNode) and exposes state, selected candidate and data-channel events on `window`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.browser import chromium, hang_up, js, start_call, write_tone_wav
from tests.e2e.edge import edge
from tools.demo.stack import Stack

API_KEY = "sk-e2e-chromium-0123456789"
TONE_HZ = 440.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The answer (a 1.3 s echo) starts after 0.7-1.0 s of end-of-turn silence; a 600 ms think
    # time keeps it playing when the next tone starts 1.6 s after the last, whatever the
    # set-up and playout delays of this run (without it the answer sometimes ended first).
    flags = {"signaling": ["--demo-page", "true"], "bridge": ["--echo-think-ms", "600"]}
    with edge(tmp_path_factory.mktemp("stack"), API_KEY, extra_flags=flags) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    wav = tmp_path / "tone.wav"
    write_tone_wav(wav, tone_s=1.0, silence_s=1.6, tone_hz=TONE_HZ)
    with chromium(tmp_path, wav) as driver:
        yield driver


def test_browser_call_through_the_relay_with_echo_and_barge_in(
    stack: Stack, browser: webdriver.Chrome
) -> None:
    start_call(browser, stack.http_base + "/")
    wait = WebDriverWait(browser, timeout=20, poll_frequency=0.2)
    relay = f"{stack.relay_udp[0]}:{stack.relay_udp[1]}"
    wait.until(lambda d: js(d, "window.voiceedgeRemote") == relay)

    # Two tone/answer cycles: the agent's answer is heard at the tone's frequency.
    slow = WebDriverWait(browser, timeout=40, poll_frequency=0.25)
    slow.until(
        lambda d: (
            (js(d, "window.voiceedgeReceived && window.voiceedgeReceived.loudWindows") or 0) >= 8
        )
    )
    peaks = js(browser, "window.voiceedgeReceived.peaksHz")
    heard = statistics.median(peaks)
    assert abs(heard - TONE_HZ) < TONE_HZ * 0.05, peaks

    # The next tone starts while the answer plays: the agent is interrupted (barge-in).
    try:
        slow.until(
            lambda d: any(
                "cancel" in e or "clear" in e for e in (js(d, "window.voiceedgeEvents") or [])
            )
        )
    except TimeoutException:
        raise AssertionError(f"no barge-in: {js(browser, 'window.voiceedgeEvents')}") from None
    events = js(browser, "window.voiceedgeEvents")
    assert any("speech_started" in e for e in events), events
    assert any("speech_stopped" in e for e in events), events

    hang_up(browser)
