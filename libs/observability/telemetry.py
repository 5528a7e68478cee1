"""OpenTelemetry set-up shared by every service: traces and metrics, a Prometheus
endpoint, OTLP export by configuration, and key=value logs keyed like OTel attributes."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from libs.config.settings import parse_host_port

if TYPE_CHECKING:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider


@dataclass
class Telemetry:
    """Handles for one process; `shutdown()` flushes exporters and may be called twice."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics_port: int = 0
    _closers: list[Any] = field(default_factory=list)
    _closed: bool = False

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer(self.service_name)

    @property
    def meter(self) -> metrics.Meter:
        return self.meter_provider.get_meter(self.service_name)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for closer in self._closers:
            closer()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    service_name: str, metrics_listen: str = "", otlp_endpoint: str = ""
) -> Telemetry:
    """Builds providers for `service_name`.

    metrics_listen "host:port" serves Prometheus /metrics (port 0 picks a free one, read back
    in `metrics_port`); otlp_endpoint "host:port" exports traces and metrics over OTLP/gRPC.
    The providers are also installed globally so instrumented libraries find them.
    """
    # Imported here, not with the module: log_event and configure_logging are on every
    # process's start-up path (the relay forwards before it sets telemetry up), and the
    # SDK and Prometheus client cost ~0.1 s of imports.
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from prometheus_client import REGISTRY, start_http_server

    resource = Resource.create({"service.name": service_name, "service.namespace": "voiceedge"})
    readers: list[MetricReader] = []
    closers: list[Any] = []
    port = 0
    if metrics_listen:
        host, wanted = parse_host_port(metrics_listen, "metrics_listen")
        readers.append(PrometheusMetricReader())
        server, _thread = start_http_server(wanted, addr=host, registry=REGISTRY)
        port = int(server.server_port)
        closers.append(server.shutdown)
    tracer_provider = TracerProvider(resource=resource)
    if otlp_endpoint:
        # Imported lazily: the OTLP exporter pulls in extra modules few dev runs need.
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True))
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(service_name, tracer_provider, meter_provider, port, closers)


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=info logger=relay event=binding.created session.id=...` lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
        ]
        fields: dict[str, Any] = getattr(record, "kv", {})
        message = record.getMessage()
        parts.append(f"event={_quote(message)}")
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"exception={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def configure_logging(level: str) -> None:
    """Entry points only: one handler on stderr with key=value lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **attrs: Any) -> None:
    """Logs `event` with attributes; use OTel names (`session.id`, `client.address`)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"kv": {k.replace("__", "."): v for k, v in attrs.items()}})
