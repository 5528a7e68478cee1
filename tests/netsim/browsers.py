"""Headless Chromium on the client host, as the cross-host browser tests run it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver

from tests.e2e.browser import chromium, write_tone_wav
from tests.netsim.calls import TONE_HZ
from tools.netsim.edge import NetEdge


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
