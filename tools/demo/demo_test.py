"""The README's first command, `./bazelw run //:demo`, as a user runs it: the whole edge
comes up on the documented ports, the page and its client secrets are served, and Ctrl-C
(SIGINT) drains every process, each exiting on its own (none SIGKILLed), and frees every
port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from queue import Empty, Queue

DEMO = Path(os.path.abspath(__file__)).parent / "demo"
PORTS_TCP = [8080, 50051, 50052, 50053, 50054, 50055, 9461, 9462, 9463, 9464, 9465]


def _read_until(process: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    """Lines until `marker`; a reader thread, since buffered pipes and select() disagree."""
    assert process.stdout is not None
    stdout = process.stdout
    queue: Queue[str] = Queue()

    def pump() -> None:
        for line in stdout:
            queue.put(line)

    threading.Thread(target=pump, daemon=True).start()
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = queue.get(timeout=remaining)
        except Empty:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} in demo output:\n{''.join(lines)}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _start_demo(stderr: Path) -> subprocess.Popen[str]:
    busy = [p for p in PORTS_TCP if not _port_free(p)]
    assert not busy, f"ports {busy} are taken (is a demo already running?)"
    with stderr.open("w") as sink:
        return subprocess.Popen(
            [str(DEMO)],
            stdout=subprocess.PIPE,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "VOICEEDGE_API_KEY": "sk-demo-test-0123456789"},
        )


def _exit_codes(stderr: Path) -> dict[str, int]:
    """The supervisor's last line: every child's exit code, by name."""
    text = stderr.read_text()
    assert "killing it" not in text, text[-2000:]
    (line,) = [x for x in text.splitlines() if x.startswith("demo: stopped; exit codes: ")]
    pairs = line.removeprefix("demo: stopped; exit codes: ").split(", ")
    return {name: int(code) for name, code in (pair.split(" ") for pair in pairs)}


def test_demo_comes_up_serves_the_page_and_stops_cleanly(tmp_path: Path) -> None:
    process = _start_demo(tmp_path / "stderr.log")
    try:
        lines = _read_until(process, "Ctrl-C stops every process", 120)
        text = "".join(lines)
        assert "open          http://127.0.0.1:8080/" in text
        assert "API key       sk-demo-test-0123456789" in text
        assert "relay UDP     127.0.0.1:3478" in text
        assert "metrics http://127.0.0.1:9465/metrics" in text  # the bridge's
        with urllib.request.urlopen("http://127.0.0.1:9465/metrics", timeout=10) as response:
            assert "voiceedge_bridge_sessions_active{" in response.read().decode()
        with urllib.request.urlopen("http://127.0.0.1:8080/", timeout=10) as response:
            assert "Talk" in response.read().decode()
        request = urllib.request.Request("http://127.0.0.1:8080/demo/client_secret", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert json.loads(response.read())["value"].startswith("ek_")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    # Each drained and exited on its own (0), none was killed.
    codes = _exit_codes(tmp_path / "stderr.log")
    assert codes == dict.fromkeys(["signaling", "relay", "transceiver", "bridge", "geosteer"], 0)
    still_bound = [p for p in PORTS_TCP if not _port_free(p)]
    assert still_bound == [], f"ports still bound after Ctrl-C: {still_bound}"
