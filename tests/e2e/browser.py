"""Headless Debian Chromium with a fake microphone playing a tone WAV: shared by the
loopback test (chromium_test.py) and the cross-host one (tests/netsim)."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

TONE_HZ = 440.0
RATE = 48000
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def write_tone_wav(path: Path) -> None:
    """A 440 Hz tone for 1 s, then 1.6 s of silence (Chromium loops it)."""
    t = np.arange(int(RATE * 1.0)) / RATE
    tone = (np.sin(2 * np.pi * TONE_HZ * t) * 0.4 * 32767).astype(np.int16)
    silence = np.zeros(int(RATE * 1.6), dtype=np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(np.concatenate([tone, silence]).tobytes())


def start_chromium(workdir: Path, secure_origin: str = "") -> webdriver.Chrome:
    """Chromium (and chromedriver) in the calling thread's network namespace.
    `secure_origin`: an http:// origin off the loopback that may still use the microphone
    (getUserMedia needs a secure context; only localhost is one without TLS)."""
    for tool in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: ./bazelw installs chromium and chromium-driver")
    wav = workdir / "tone.wav"
    write_tone_wav(wav)
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
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={workdir / 'profile'}",
    ):
        options.add_argument(flag)
    if secure_origin:
        options.add_argument(f"--unsafely-treat-insecure-origin-as-secure={secure_origin}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def js(driver: webdriver.Chrome, expression: str) -> Any:
    return driver.execute_script(f"return {expression};")
