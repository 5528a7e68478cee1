"""Telemetry: a real Prometheus endpoint serves our counters; log lines are key=value."""

from __future__ import annotations

import logging
import urllib.request

from libs.observability.telemetry import KeyValueFormatter, log_event, setup_telemetry


def test_prometheus_endpoint_serves_counters() -> None:
    telemetry = setup_telemetry("unit", metrics_listen="127.0.0.1:0")
    try:
        assert telemetry.metrics_port > 0
        counter = telemetry.meter.create_counter("voiceedge_test_packets", unit="1")
        counter.add(3, {"direction": "in"})
        url = f"http://127.0.0.1:{telemetry.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        assert 'voiceedge_test_packets_total{direction="in"' in body
    finally:
        telemetry.shutdown()
        telemetry.shutdown()  # idempotent


def test_key_value_log_line() -> None:
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("kvtest")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    log_event(logger, "session.closed", session__id="s1", reason="client hangup")
    line = KeyValueFormatter().format(records[0])
    assert "event=session.closed" in line
    assert "session.id=s1" in line
    assert 'reason="client hangup"' in line
