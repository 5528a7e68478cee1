"""Every metric voiceedge exports, declared once: name, kind, unit, labels, meaning.

Names follow one scheme, `voiceedge_<service>_<what>[_<unit>]`, as Prometheus shows them;
counters get Prometheus' `_total` and histograms `_bucket`/`_sum`/`_count`. Instruments are
created with an empty OpenTelemetry unit so the exporter adds no suffix of its own (it would
turn `ms` into `_milliseconds`); the unit lives in the name. Services create instruments
only through `MetricSpec.create` (the lint test refuses a string-named instrument anywhere
else), and METRICS.md's table is `markdown_table()` (a test keeps them equal).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics


class Kind(enum.Enum):
    COUNTER = "counter"
    UP_DOWN_COUNTER = "gauge (up/down)"
    HISTOGRAM = "histogram"
    OBSERVABLE_COUNTER = "counter (read at scrape)"
    OBSERVABLE_GAUGE = "gauge (read at scrape)"
    OBSERVABLE_UP_DOWN_COUNTER = "gauge (up/down, read at scrape)"

    @property
    def is_counter(self) -> bool:
        return self in (Kind.COUNTER, Kind.OBSERVABLE_COUNTER)

    @property
    def is_observable(self) -> bool:
        return self.name.startswith("OBSERVABLE_")


Callback = Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]


@dataclass(frozen=True)
class MetricSpec:
    service: str
    what: str
    kind: Kind
    description: str
    unit: str = ""  # part of the name: "ms", "bytes"; empty for counts of things
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only: upper bounds; empty: the SDK's default

    @property
    def name(self) -> str:
        """The instrument's name, which the Prometheus exporter keeps as it is."""
        return f"voiceedge_{self.service}_{self.what}" + (f"_{self.unit}" if self.unit else "")

    @property
    def prometheus_name(self) -> str:
        return self.name + ("_total" if self.kind.is_counter else "")

    def create(self, meter: metrics.Meter, callbacks: Sequence[Callback] = ()) -> Any:
        """The OpenTelemetry instrument; observable kinds need their callbacks."""
        if self.kind.is_observable != bool(callbacks):
            raise ValueError(f"{self.name}: callbacks are for observable instruments only")
        if self.buckets and self.kind is not Kind.HISTOGRAM:
            raise ValueError(f"{self.name}: buckets are for histograms only")
        common: dict[str, Any] = {"unit": "", "description": self.description}
        if self.kind is Kind.COUNTER:
            return meter.create_counter(self.name, **common)
        if self.kind is Kind.UP_DOWN_COUNTER:
            return meter.create_up_down_counter(self.name, **common)
        if self.kind is Kind.HISTOGRAM:
            if self.buckets:
                common["explicit_bucket_boundaries_advisory"] = list(self.buckets)
            return meter.create_histogram(self.name, **common)
        if self.kind is Kind.OBSERVABLE_COUNTER:
            return meter.create_observable_counter(self.name, list(callbacks), **common)
        if self.kind is Kind.OBSERVABLE_GAUGE:
            return meter.create_observable_gauge(self.name, list(callbacks), **common)
        return meter.create_observable_up_down_counter(self.name, list(callbacks), **common)


# -- relay ---------------------------------------------------------------------------------
RELAY_PACKETS = MetricSpec(
    "relay",
    "packets",
    Kind.OBSERVABLE_COUNTER,
    "UDP packets through the relay (stage: received or forwarded)",
    labels=("direction", "class", "stage"),
)
RELAY_BYTES = MetricSpec(
    "relay",
    "bytes",
    Kind.OBSERVABLE_COUNTER,
    "bytes of the inner packets through the relay",
    labels=("direction", "class", "stage"),
)
RELAY_DROPS = MetricSpec(
    "relay", "drops", Kind.OBSERVABLE_COUNTER, "packets dropped", labels=("direction", "reason")
)
RELAY_BINDINGS = MetricSpec(
    "relay", "bindings", Kind.OBSERVABLE_GAUGE, "client bindings held in memory"
)
RELAY_BINDING_EVICTIONS = MetricSpec(
    "relay",
    "binding_evictions",
    Kind.OBSERVABLE_COUNTER,
    "oldest bindings evicted because max_bindings was reached",
)
RELAY_REDIS_OPS = MetricSpec(
    "relay",
    "redis_ops",
    Kind.OBSERVABLE_COUNTER,
    "Redis binding store operations (only with Redis configured)",
    labels=("result",),
)
RELAY_TCP_CONNECTIONS = MetricSpec(
    "relay",
    "tcp_connections",
    Kind.OBSERVABLE_GAUGE,
    "ICE-TCP connections (state: pending = awaiting a valid first STUN frame, or open)",
    labels=("state",),
)
RELAY_TCP_CLOSED = MetricSpec(
    "relay",
    "tcp_closed",
    Kind.OBSERVABLE_COUNTER,
    "ICE-TCP connections closed or refused, by reason",
    labels=("reason",),
)
RELAY_TCP_FRAMES = MetricSpec(
    "relay",
    "tcp_frames",
    Kind.OBSERVABLE_COUNTER,
    "RFC 4571 frames forwarded over ICE-TCP connections",
    labels=("direction",),
)
RELAY_TCP_FRAME_DROPS = MetricSpec(
    "relay",
    "tcp_frame_drops",
    Kind.OBSERVABLE_COUNTER,
    "ICE-TCP frames dropped on open connections (refused by the router, or the client not reading)",
)
RELAY_WORKER_RESTARTS = MetricSpec(
    "relay",
    "worker_restarts",
    Kind.OBSERVABLE_COUNTER,
    "relay worker processes replaced after they died",
)
RELAY_TOPOLOGY_RETAINED = MetricSpec(
    "relay",
    "topology_retained",
    Kind.OBSERVABLE_GAUGE,
    "transceivers kept although geosteer's last answer left them out (live bindings or "
    "topology_hold_s)",
)

# -- transceiver ---------------------------------------------------------------------------
TRANSCEIVER_SESSIONS_CREATED = MetricSpec(
    "transceiver", "sessions_created", Kind.COUNTER, "sessions created"
)
TRANSCEIVER_SESSIONS_CLOSED = MetricSpec(
    "transceiver", "sessions_closed", Kind.COUNTER, "sessions closed", labels=("close_reason",)
)
TRANSCEIVER_SESSIONS_ACTIVE = MetricSpec(
    "transceiver", "sessions_active", Kind.OBSERVABLE_UP_DOWN_COUNTER, "open sessions"
)
TRANSCEIVER_UDPMUX_DROPS = MetricSpec(
    "transceiver",
    "udpmux_drops",
    Kind.OBSERVABLE_COUNTER,
    "datagrams dropped by the shared media socket",
    labels=("drop_reason",),
)
TRANSCEIVER_CALLER_FRAMES = MetricSpec(
    "transceiver",
    "caller_frames",
    Kind.COUNTER,
    "caller audio frames towards the bridge that were not the caller's own packet in time, "
    "by frame_outcome: concealed (PLC), fec_recovered (Opus in-band FEC), red_recovered "
    "(RFC 2198), dtx (silence the caller sent as DTX), lost (a sequence gap), late (came "
    "after its slot); added when the session ends",
    labels=("frame_outcome",),
)
TRANSCEIVER_FIRST_WORDS_DROPPED = MetricSpec(
    "transceiver",
    "first_words_dropped_frames",
    Kind.COUNTER,
    "caller audio frames dropped before the bridge accepted, beyond first_words_max_s",
)
TRANSCEIVER_EVENT_LOOP_LAG = MetricSpec(
    "transceiver",
    "event_loop_lag",
    Kind.OBSERVABLE_GAUGE,
    "median lateness of the event loop over the last 2 s (admission_max_loop_lag_ms)",
    unit="ms",
)
TRANSCEIVER_CPU = MetricSpec(
    "transceiver",
    "cpu",
    Kind.OBSERVABLE_GAUGE,
    "median CPU of the process (all threads) over the last 2 s, as a share of one core "
    "(admission_max_cpu_percent)",
    unit="percent",
)
TRANSCEIVER_SESSIONS_REFUSED = MetricSpec(
    "transceiver",
    "sessions_refused",
    Kind.COUNTER,
    "CreateSession refusals (refusal_reason: draining, capacity, overloaded, bridge_unavailable)",
    labels=("refusal_reason",),
)
TRANSCEIVER_SESSIONS_MAX = MetricSpec(
    "transceiver",
    "sessions_max",
    Kind.OBSERVABLE_GAUGE,
    "sessions this transceiver admits (max_sessions): capacity beside sessions_active",
)
TRANSCEIVER_CALL_SETUP_DURATION = MetricSpec(
    "transceiver",
    "call_setup_duration",
    Kind.HISTOGRAM,
    "answer returned to the session's milestone (stage: connected = ICE and DTLS up, "
    "first_audio = the caller's first audio packet)",
    unit="ms",
    labels=("stage",),
    buckets=(10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000),
)
TRANSCEIVER_RTT = MetricSpec(
    "transceiver",
    "rtt",
    Kind.HISTOGRAM,
    "first-hop round-trip time (transceiver, relay, caller and back), one sample per "
    "caller RTCP receiver report (RFC 3550 §6.4.1 LSR/DLSR)",
    unit="ms",
    buckets=(5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000),
)
TRANSCEIVER_JITTER = MetricSpec(
    "transceiver",
    "jitter",
    Kind.HISTOGRAM,
    "interarrival jitter of our audio at the caller, per caller RTCP receiver report",
    unit="ms",
    buckets=(1, 2, 5, 10, 20, 30, 50, 100, 200, 500),
)
TRANSCEIVER_LOSS = MetricSpec(
    "transceiver",
    "loss",
    Kind.HISTOGRAM,
    "fraction of our audio packets lost on the way to the caller since its previous "
    "receiver report (RTCP fraction lost / 256)",
    unit="ratio",
    buckets=(0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
)

# Per-turn latency and the call record (services/transceiver/turn_timing.py, call_metrics.py).
TURN_BUCKETS_S = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TRANSCEIVER_TURN_VOICE_TO_VOICE = MetricSpec(
    "transceiver",
    "turn_voice_to_voice",
    Kind.HISTOGRAM,
    "per turn: end of the caller's speech (as the bridge detected it) to the first packet of "
    "the answer sent to the caller; the sum of turn_stage_seconds",
    unit="seconds",
    buckets=TURN_BUCKETS_S,
)
TRANSCEIVER_TURN_STAGE = MetricSpec(
    "transceiver",
    "turn_stage",
    Kind.HISTOGRAM,
    "per turn, its parts (stage: end_of_turn = speech end to SpeechStopped here, bridge = "
    "SpeechStopped to the answer's first audio frame, playout = that frame to its first "
    "packet sent)",
    unit="seconds",
    labels=("stage",),
    buckets=TURN_BUCKETS_S,
)
TRANSCEIVER_CALL_DURATION = MetricSpec(
    "transceiver",
    "call_duration",
    Kind.HISTOGRAM,
    "per call record: session created to closed",
    unit="seconds",
    labels=("close_reason",),
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
TRANSCEIVER_CALL_TURNS = MetricSpec(
    "transceiver",
    "call_turns",
    Kind.HISTOGRAM,
    "per call record: turns measured (answers played after the caller's speech ended)",
    labels=("close_reason",),
    buckets=(0, 1, 2, 5, 10, 20, 50, 100),
)
TRANSCEIVER_CALL_VOICE_TO_VOICE = MetricSpec(
    "transceiver",
    "call_voice_to_voice",
    Kind.HISTOGRAM,
    "per call record with turns: its median (quantile p50) and p95 turn voice-to-voice latency",
    unit="seconds",
    labels=("quantile",),
    buckets=TURN_BUCKETS_S,
)
TRANSCEIVER_CALL_QUALITY = MetricSpec(
    "transceiver",
    "call_quality",
    Kind.HISTOGRAM,
    "per call record: MOS estimate (1 to 4.5) of the ITU-T G.107 E-model from the call's "
    "loss, jitter and round trip (services/transceiver/call_quality.py)",
    unit="mos",
    labels=("close_reason",),
    buckets=(1.0, 2.0, 2.5, 3.0, 3.5, 3.8, 4.0, 4.2, 4.4, 4.5),
)
TRANSCEIVER_CALLER_FRAMES_REPAIRED = MetricSpec(
    "transceiver",
    "caller_frames_repaired",
    Kind.COUNTER,
    "lost caller frames filled in before the bridge, counted at each call record (repair: "
    "concealed = libopus PLC, fec = Opus in-band FEC)",
    labels=("repair",),
)

# -- signaling -----------------------------------------------------------------------------
SIGNALING_CALLS = MetricSpec(
    "signaling",
    "calls",
    Kind.COUNTER,
    "call set-ups by outcome (an error code, or 'created')",
    labels=("outcome",),
)
SIGNALING_CALL_SETUP_DURATION = MetricSpec(
    "signaling",
    "call_setup_duration",
    Kind.HISTOGRAM,
    "offer POST received to answer sent, for created calls",
    unit="ms",
)

# -- geosteer ------------------------------------------------------------------------------
GEOSTEER_TOPOLOGY_REVISION = MetricSpec(
    "geosteer", "topology_revision", Kind.OBSERVABLE_GAUGE, "revision of the live topology"
)
GEOSTEER_RTT_SAMPLES_DROPPED = MetricSpec(
    "geosteer",
    "rtt_samples_dropped",
    Kind.OBSERVABLE_COUNTER,
    "malformed RTT samples in heartbeats",
)

# -- bridge --------------------------------------------------------------------------------
BRIDGE_SESSIONS_ACTIVE = MetricSpec(
    "bridge", "sessions_active", Kind.UP_DOWN_COUNTER, "open bridge sessions"
)
BRIDGE_SESSIONS_OPENED = MetricSpec(
    "bridge", "sessions_opened", Kind.COUNTER, "bridge sessions accepted"
)
BRIDGE_UPSTREAM_RECONNECTS = MetricSpec(
    "bridge",
    "upstream_reconnects",
    Kind.COUNTER,
    "realtime upstream WebSockets replaced during a call (cause: go_away = announced, "
    "expired = session_expired error, closed = upstream closed, error = socket failed)",
    labels=("cause",),
)
BRIDGE_UPSTREAM_ERRORS = MetricSpec(
    "bridge",
    "upstream_errors",
    Kind.COUNTER,
    "realtime upstream errors by error_type (unreachable: reconnect attempts ran out); "
    "fatal=true ended the call",
    labels=("error_type", "fatal"),
)

CATALOGUE: tuple[MetricSpec, ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, MetricSpec)
)

# Prometheus names before the one scheme (2026-12), for dashboards and alerts.
RENAMED = {
    "signaling_calls_total": SIGNALING_CALLS.prometheus_name,
    "signaling_call_setup_duration_milliseconds": SIGNALING_CALL_SETUP_DURATION.prometheus_name,
    "geosteer_topology_revision": GEOSTEER_TOPOLOGY_REVISION.prometheus_name,
    "geosteer_rtt_samples_dropped_total": GEOSTEER_RTT_SAMPLES_DROPPED.prometheus_name,
    "bridge_sessions_active": BRIDGE_SESSIONS_ACTIVE.prometheus_name,
    "bridge_sessions_opened_total": BRIDGE_SESSIONS_OPENED.prometheus_name,
    "voiceedge_transceiver_udpmux_dropped_total": TRANSCEIVER_UDPMUX_DROPS.prometheus_name,
}


def markdown_table() -> str:
    rows = ["| Prometheus name | kind | labels | meaning |", "|---|---|---|---|"]
    for spec in sorted(CATALOGUE, key=lambda s: (s.service, s.what)):
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        rows.append(
            f"| `{spec.prometheus_name}` | {spec.kind.value} | {labels} | {spec.description} |"
        )
    return "\n".join(rows) + "\n"
