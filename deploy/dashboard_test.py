"""The Grafana dashboard asks only for what the services really export: a real Prometheus
(Debian's) scrapes the whole edge (every service its own process, /metrics on free
loopback ports), a real call runs through it, and then every metric name of every panel
expression is among the names Prometheus scraped, every expression evaluates, and a few
values are plausible (one active call, a first-hop RTT, a set-up time, counted drops).

Prometheus listens on 127.0.0.1 only, keeps its data in the test's tmp dir, and is started
and stopped by its PID."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.python_client.client import run_call
from tests.e2e.edge import edge
from tools.demo.stack import Stack

HERE = Path(__file__).parent
DASHBOARD = HERE / "grafana" / "voiceedge.json"
API_KEY = "sk-dashboard-0123456789abcdef"
SERVICES = ("geosteer", "bridge", "transceiver", "relay", "signaling")
SCRAPE_INTERVAL = "1s"
MAX_SESSIONS = 50
NAME = re.compile(r"\bvoiceedge_[a-z0-9_]+\b")


def panel_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    assert len(exprs) > 10
    return exprs


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """One Prometheus process and its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], base: str) -> None:
        self.process = process
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def names(self) -> set[str]:
        return set(self.get("/api/v1/label/__name__/values"))

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it returns nothing."""
        result = self.get("/api/v1/query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    flags = {"transceiver": ["--max-sessions", str(MAX_SESSIONS)]}
    with edge(tmp_path, API_KEY, extra_flags=flags, metrics=True) as running:
        yield running


@pytest.fixture
def prometheus(tmp_path: Path, stack: Stack) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus is missing (./bazelw installs it)"
    jobs = [
        {"job_name": name, "static_configs": [{"targets": [stack.metrics(name)]}]}
        for name in SERVICES
    ]
    config = tmp_path / "prometheus.yml"
    # JSON is YAML: no YAML writer needed.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
                "scrape_configs": jobs,
            }
        )
    )
    port = _free_tcp_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    server = Prometheus(process, f"http://127.0.0.1:{port}")
    try:
        log_path = tmp_path / "prometheus.log"
        _wait(lambda: _ready(server, log_path), 30, "Prometheus to be ready", log_path)
        yield server
    finally:
        server.stop()


def _ready(server: Prometheus, log: Path) -> bool:
    if server.process.poll() is not None:
        said = log.read_text()[-2000:]
        raise AssertionError(f"prometheus exited with {server.process.returncode}:\n{said}")
    try:
        with urllib.request.urlopen(f"{server.base}/-/ready", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


def _wait(check: Any, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    said = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{said}")


def _send_junk(address: tuple[str, int]) -> None:
    """A datagram that is neither STUN nor a relay frame: a counted drop."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00junk" * 4, address)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _scrapes_up(server: Prometheus) -> bool:
    return server.value("count(up == 1)") == len(SERVICES)


@pytest.mark.timeout_s(120)
async def test_every_panel_metric_is_scraped_from_a_real_call(
    stack: Stack, prometheus: Prometheus
) -> None:
    await asyncio.to_thread(_wait, lambda: _scrapes_up(prometheus), 20, "every scrape to be up")
    _send_junk(stack.relay_udp)
    _send_junk(_host_port(str(stack.services["transceiver"].ready["media"])))
    # A refused call set-up (wrong key), so the signaling error panel has a series too.
    refused = await run_call(stack.http_base, "sk-wrong-key-0123456789", seconds=0)
    assert refused.status == 401

    call = asyncio.create_task(run_call(stack.http_base, API_KEY, seconds=6.0))
    try:
        active = "sum(voiceedge_transceiver_sessions_active)"
        await asyncio.to_thread(
            _wait, lambda: prometheus.value(active) == 1, 30, "one active call in Prometheus"
        )
        # The names the first-hop panels need come with the caller's receiver reports.
        wanted = {name for expr in panel_expressions() for name in NAME.findall(expr)}
        await asyncio.to_thread(
            _wait, lambda: wanted <= prometheus.names(), 40, "every panel's metric"
        )
    finally:
        result = await call
    assert result.status == 201, result.error_body
    assert result.connected

    missing = wanted - prometheus.names()
    assert not missing, f"panels use metrics nobody exports: {sorted(missing)}"
    for expr in panel_expressions():
        query = expr.replace("$__rate_interval", "1m")
        prometheus.get("/api/v1/query", query=query)  # status success: it parses and runs

    def value(expr: str) -> float:
        got = prometheus.value(expr)
        assert got is not None, expr
        return got

    assert value("max(voiceedge_transceiver_sessions_max)") == MAX_SESSIONS
    assert value("sum(voiceedge_transceiver_sessions_created_total)") == 1
    rtt = value("sum(voiceedge_transceiver_rtt_ms_sum) / sum(voiceedge_transceiver_rtt_ms_count)")
    assert 0 <= rtt < 1000  # loopback
    setup = value(
        'sum(voiceedge_transceiver_call_setup_duration_ms_sum{stage="connected"})'
        ' / sum(voiceedge_transceiver_call_setup_duration_ms_count{stage="connected"})'
    )
    assert 0 < setup < 10_000
    assert value("sum(voiceedge_relay_drops_total)") >= 1
    assert value("sum(voiceedge_transceiver_udpmux_drops_total)") >= 1
    assert value('sum(voiceedge_signaling_calls_total{outcome="created"})') == 1
