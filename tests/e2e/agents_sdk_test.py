"""OpenAI's own browser SDK, unchanged but for its base URL, through the whole edge.

`@openai/agents-realtime` (pinned in tools/node/package-lock.json; its UMD bundle, as npm
ships it) runs in headless Debian Chromium on a page served from another origin than
signaling: `RealtimeSession` over `OpenAIRealtimeWebRTC({baseUrl: <signaling>/v1/realtime/
calls})`, `connect({apiKey: ek_...})` with a client secret the test mints as a backend
would. What the SDK needs from voiceedge: CORS for its `X-OpenAI-Agents-SDK` header,
`session.updated` for its `session.update` (connect() waits up to 5 s for it), `event_id`
on every server event (else its parser files them as generic and no typed event fires),
and `output_audio_buffer.clear` honoured by its `interrupt()`.

The microphone WAV is a 440 Hz tone for 1.6 s, then 4.4 s of silence, looped. The echo
agent answers each tone after its end-of-turn silence (~0.7 s) with the utterance (~1.9 s
with its prefix padding), so each answer ends ~2.6 s after the tone and well before the
next one: the first answer is heard whole, the second is interrupted 300 ms into its sound,
when more than a second of it is left. Were the clear ignored it would play on that long.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.browser import chromium, js, write_tone_wav
from tests.e2e.edge import edge
from tools.demo.stack import Stack

API_KEY = "sk-e2e-agents-sdk-0123456789"
TONE_HZ = 440.0
PAGE = Path("tests/e2e/agents_sdk_page.html")
BUNDLE_NAME = "openai-realtime-agents.umd.js"
# connect() resolves on session.updated, or after the SDK's own 5 s timeout without one.
CONNECT_BOUND_MS = 3000
# The echo would play on for more than a second if output_audio_buffer.clear were ignored.
# The target is 100 ms (printed and recorded in BENCHMARKS.md); this bound is the
# behaviour (clear honoured at all), with room for Chromium's jitter buffer and the
# page's 10 ms energy window on a loaded 2-core machine.
INTERRUPT_BOUND_MS = 500
INTERRUPT_AFTER_LOUD_MS = 300


class _PageServer(ThreadingHTTPServer):
    """The app's own origin: the page and the SDK bundle, nothing else."""

    def __init__(self, files: dict[str, tuple[str, bytes]]) -> None:
        self.files = files
        super().__init__(("127.0.0.1", 0), _PageHandler)


class _PageHandler(BaseHTTPRequestHandler):
    server: _PageServer

    def do_GET(self) -> None:
        found = self.server.files.get(self.path)
        if found is None:
            self.send_error(404)
            return
        content_type, body = found
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the test output stays readable
        pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with edge(tmp_path_factory.mktemp("stack"), API_KEY) as running:
        yield running


@pytest.fixture
def app_origin() -> Iterator[str]:
    bundle = Path(os.environ["AGENTS_REALTIME_BUNDLE"]).read_bytes()
    server = _PageServer(
        {
            "/": ("text/html; charset=utf-8", PAGE.read_bytes()),
            "/" + BUNDLE_NAME: ("text/javascript; charset=utf-8", bundle),
        }
    )
    thread = threading.Thread(target=server.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    wav = tmp_path / "tone.wav"
    write_tone_wav(wav, tone_s=1.6, silence_s=4.4, tone_hz=TONE_HZ)
    with chromium(tmp_path, wav) as driver:
        yield driver


def _client_secret(stack: Stack) -> str:
    """What an app's backend does: trade its API key for a short-lived ek_ for the browser."""
    request = urllib.request.Request(  # noqa: S310 (a loopback http URL)
        stack.http_base + "/v1/realtime/client_secrets",
        data=json.dumps({"session": {"type": "realtime"}}).encode(),
        headers={"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        value: str = json.load(response)["value"]
    assert value.startswith("ek_"), value
    return value


def _until(driver: webdriver.Chrome, what: str, expression: str, timeout_s: float) -> Any:
    """Waits for a truthy page expression; on timeout fails with the page's whole state."""
    try:
        return WebDriverWait(driver, timeout=timeout_s, poll_frequency=0.05).until(
            lambda d: js(d, expression)
        )
    except Exception as exc:
        state = js(driver, "JSON.stringify({...window.sdk, raw: window.sdk.raw.slice(-40)})")
        raise AssertionError(
            f"timed out waiting for {what}; page state: {state}; {_console(driver)}"
        ) from exc


def _console(driver: webdriver.Chrome) -> str:
    """The page's console (CORS refusals, SDK warnings such as its session.updated timeout)."""
    # selenium ships get_log without annotations.
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return "console: " + " | ".join(str(e.get("message", e)) for e in entries)


def test_agents_sdk_connects_hears_the_echo_and_interrupts(
    stack: Stack,
    app_origin: str,
    browser: webdriver.Chrome,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def figure(name: str, ms: float, note: str = "") -> None:
        # Printed past pytest's capture: in test.log even when the test passes.
        with capsys.disabled():
            print(f"agents_sdk: {name} {ms:.0f} ms{note}")

    assert app_origin.rsplit(":", 1)[1] != stack.http_base.rsplit(":", 1)[1]
    browser.get(app_origin + "/")
    _until(browser, "the SDK bundle", "window.OpenAIAgentsRealtime && window.sdk", 10)
    browser.execute_script(
        "window.connectSdk(arguments[0], arguments[1]);",
        stack.http_base + "/v1/realtime/calls",
        _client_secret(stack),
    )
    _until(browser, "connect() to settle", "window.sdk.state !== 'connecting'", 15)
    sdk = js(browser, "window.sdk")
    assert sdk["state"] == "connected", f"connect() failed: {sdk['error']}; {_console(browser)}"
    connect_ms = float(sdk["connectMs"])
    figure("connect_ms", connect_ms)
    assert connect_ms < CONNECT_BOUND_MS, "connect() waited for its session.updated timeout"

    # The first answer, heard whole: the echo of the tone, one typed turn.
    _until(browser, "the first turn_done", "window.sdk.turnDone >= 1", 20)
    _until(browser, "the echo", "window.sdk.loud.windows >= 5", 5)
    peaks = js(browser, "window.sdk.loud.peaksHz")
    assert abs(statistics.median(peaks) - TONE_HZ) < TONE_HZ * 0.05, peaks

    # The second answer, interrupted by the SDK while it plays.
    turns_before = int(js(browser, "window.sdk.turnDone"))
    js(browser, f"window.armInterrupt({INTERRUPT_AFTER_LOUD_MS})")
    _until(browser, "interrupt() during the second answer", "window.sdk.interrupt.at", 15)
    silence_ms = float(_until(browser, "the agent's audio to stop", "window.sdk.interrupt.ms", 5))
    figure(
        "interrupt_to_silence_ms",
        silence_ms,
        f" (issue target 100 ms, bound {INTERRUPT_BOUND_MS} ms)",
    )
    assert silence_ms < INTERRUPT_BOUND_MS, "output_audio_buffer.clear was not honoured"
    _until(
        browser, "output_audio_buffer.cleared", "window.sdk.typed['output_audio_buffer.cleared']", 5
    )
    _until(browser, "the interrupted turn_done", f"window.sdk.turnDone > {turns_before}", 5)
    interrupt = _until(
        browser,
        "the jitter buffer figure",
        "window.sdk.interrupt.jitterBufferMs !== undefined && window.sdk.interrupt",
        5,
    )
    if interrupt["clearedMs"] is not None:
        figure("interrupt_to_cleared_event_ms", float(interrupt["clearedMs"]))
    figure("jitter_buffer_mean_ms", float(interrupt["jitterBufferMs"]))

    sdk = js(browser, "window.sdk")
    # Each event type the page counts (TYPED there) reached it as a typed SDK event.
    never = sorted(event_type for event_type, count in sdk["typed"].items() if count < 1)
    assert never == [], f"no typed SDK event of these types: {never}"
    assert sdk["turnStarted"] >= 2, sdk["turnStarted"]
    raw = sdk["raw"]
    assert raw, "no raw ('*') transport events"
    without_id = sorted({e["type"] for e in raw if not e["eventId"]})
    assert without_id == [], f"server events without event_id: {without_id}"
    ids = [e["eventId"] for e in raw]
    assert len(ids) == len(set(ids)), "event_id values repeat"

    browser.execute_script("window.hangUp();")
    assert js(browser, "window.sdk.state") == "closed"
