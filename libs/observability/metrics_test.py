"""The metric catalogue: one naming scheme, names Prometheus really shows, and METRICS.md."""

from __future__ import annotations

import re

import pytest
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest

from libs.observability.metrics import CATALOGUE, RENAMED, Kind, MetricSpec

SCHEME = re.compile(r"voiceedge_(relay|transceiver|signaling|geosteer|bridge)_[a-z0-9_]+")


def test_every_name_follows_the_scheme_once() -> None:
    names = [spec.prometheus_name for spec in CATALOGUE]
    assert len(names) == len(set(names)) > 10
    for spec in CATALOGUE:
        assert SCHEME.fullmatch(spec.name), spec.name
        assert spec.name.startswith(f"voiceedge_{spec.service}_")
        assert all(re.fullmatch(r"[a-z_]+", label) for label in spec.labels)


def test_prometheus_shows_exactly_the_catalogued_names() -> None:
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("catalogue")
    try:
        for spec in CATALOGUE:
            labels = {label: "x" for label in spec.labels}
            if spec.kind.is_observable:

                def callback(
                    options: metrics.CallbackOptions, labels: dict[str, str] = labels
                ) -> list[metrics.Observation]:
                    return [metrics.Observation(1, labels)]

                spec.create(meter, [callback])
            else:
                instrument = spec.create(meter)
                (instrument.record if spec.kind is Kind.HISTOGRAM else instrument.add)(1, labels)
        shown = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()  # also takes the reader's collector out of REGISTRY
    exported = set(re.findall(r"^(voiceedge_[a-z0-9_]+)", shown, re.MULTILINE))
    expected = set()
    for spec in CATALOGUE:
        if spec.kind is Kind.HISTOGRAM:
            expected |= {spec.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            expected.add(spec.prometheus_name)
    assert exported == expected


def test_callbacks_only_for_observables() -> None:
    spec = MetricSpec("relay", "x", Kind.COUNTER, "d")
    with pytest.raises(ValueError, match="callbacks"):
        spec.create(metrics.get_meter("t"), [lambda options: []])
    with pytest.raises(ValueError, match="callbacks"):
        MetricSpec("relay", "y", Kind.OBSERVABLE_GAUGE, "d").create(metrics.get_meter("t"))


def test_renames_point_at_catalogued_names() -> None:
    names = {spec.prometheus_name for spec in CATALOGUE}
    assert set(RENAMED.values()) <= names
    assert not set(RENAMED) & names


def test_histogram_buckets_reach_prometheus() -> None:
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        spec = MetricSpec("transceiver", "test_loss", Kind.HISTOGRAM, "d", "ratio", (), (0, 0.01))
        spec.create(provider.get_meter("buckets")).record(0.005)
        shown = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()
    for bound, count in (("0", "0.0"), ("0.01", "1.0")):
        pattern = rf'test_loss_ratio_bucket{{[^}}]*le="{re.escape(bound)}"[^}}]*}} {count}'
        assert re.search(pattern, shown), (bound, shown)
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("relay", "z", Kind.COUNTER, "d", buckets=(1,)).create(metrics.get_meter("t"))
