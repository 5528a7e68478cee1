"""Headless Debian Chromium with a fake microphone, shared by the browser end-to-end tests."""

from __future__ import annotations

import contextlib
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAV_RATE = 48000


def write_tone_wav(path: Path, *, tone_s: float, silence_s: float, tone_hz: float) -> None:
    """A tone then silence, mono 48 kHz; Chromium loops it as the microphone."""
    t = np.arange(int(WAV_RATE * tone_s)) / WAV_RATE
    tone = (np.sin(2 * np.pi * tone_hz * t) * 0.4 * 32767).astype(np.int16)
    silence = np.zeros(int(WAV_RATE * silence_s), dtype=np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(WAV_RATE)
        wav.writeframes(np.concatenate([tone, silence]).tobytes())


@contextlib.contextmanager
def chromium(
    workdir: Path, microphone_wav: Path, *, secure_origin: str = ""
) -> Iterator[webdriver.Chrome]:
    """Chromium on loopback only, the WAV as its microphone, media and autoplay allowed.
    `secure_origin`: an http:// origin off the loopback that may still use the microphone
    (getUserMedia needs a secure context; only localhost is one without TLS): tests/netsim
    runs Chromium on a client host behind a NAT, in the calling thread's namespace."""
    for tool in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: ./bazelw installs chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={workdir / 'profile'}",
    ):
        options.add_argument(flag)
    if secure_origin:
        options.add_argument(f"--unsafely-treat-insecure-origin-as-secure={secure_origin}")
    # Every console line, not just errors: a failing test prints CORS refusals and warnings.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: webdriver.Chrome, expression: str) -> Any:
    """The value of a JavaScript expression in the page."""
    return driver.execute_script(f"return {expression};")


def start_call(driver: webdriver.Chrome, page_url: str, timeout_s: float = 20) -> None:
    """Opens the demo page, clicks Talk and waits until the call is connected."""
    driver.get(page_url)
    driver.find_element(By.ID, "talk").click()
    wait = WebDriverWait(driver, timeout=timeout_s, poll_frequency=0.2)
    wait.until(lambda d: js(d, "window.voiceedgeState") == "connected")


def hang_up(driver: webdriver.Chrome, timeout_s: float = 20) -> None:
    """Clicks Hang up on the demo page and waits until it is idle again."""
    driver.find_element(By.ID, "talk").click()
    wait = WebDriverWait(driver, timeout=timeout_s, poll_frequency=0.2)
    wait.until(lambda d: js(d, "document.getElementById('state').textContent") == "idle")
