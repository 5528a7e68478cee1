"""What the transceiver's sessions tell operators, beside the session counters in manager.py:
call set-up time, first-hop RTT, jitter and loss, and capacity.

RTT, jitter and loss come from the caller's RTCP receiver reports on our audio (RFC 3550
§6.4.1), one sample per report block (about one a second per call): the caller measures
what our packets met on the first hop (transceiver, relay, caller), and the report's
LSR/DLSR give the round trip without clock sync. aiortc parses the reports and keeps only
a smoothed RTT; `aiortc_compat.tap_receiver_reports` hands each block here as it comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import metrics

from libs.observability.metrics import (
    TRANSCEIVER_CALL_SETUP_DURATION,
    TRANSCEIVER_JITTER,
    TRANSCEIVER_LOSS,
    TRANSCEIVER_RTT,
    TRANSCEIVER_SESSIONS_MAX,
)
from services.transceiver import aiortc_compat
from services.transceiver.media import OPUS_CLOCK_HZ

# A round trip past this is a report that does not match our sender report (or a clock
# step), not a network: it is left out rather than recorded.
RTT_MAX_S = 60.0


@dataclass(frozen=True)
class LinkSample:
    loss_ratio: float
    jitter_ms: float
    rtt_ms: float | None


def link_sample(report: aiortc_compat.ReceiverReport, clock_hz: int = OPUS_CLOCK_HZ) -> LinkSample:
    """One report block in operators' units: loss 0..1, jitter and RTT in ms."""
    rtt = report.rtt_s
    rtt_ms = rtt * 1000.0 if rtt is not None and 0.0 <= rtt <= RTT_MAX_S else None
    return LinkSample(
        loss_ratio=report.fraction_lost / 256.0,
        jitter_ms=report.jitter_ticks * 1000.0 / clock_hz,
        rtt_ms=rtt_ms,
    )


class WatchedSession(Protocol):
    """What the metrics read of a session (session.Session has all of it)."""

    @property
    def id(self) -> str: ...

    @property
    def pc(self) -> Any: ...

    @property
    def ttfa_in_ms(self) -> float: ...  # created to the caller's first audio; 0 before


@dataclass
class _Watch:
    session: WatchedSession
    answered_at: float  # monotonic
    negotiate_ms: float  # session created to answer returned
    connected: bool = False
    first_audio: bool = False


class CallMetrics:
    def __init__(
        self,
        meter: metrics.Meter,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,  # RTCP's, for the round trips
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._watches: dict[str, _Watch] = {}
        self._setup = TRANSCEIVER_CALL_SETUP_DURATION.create(meter)
        self._rtt = TRANSCEIVER_RTT.create(meter)
        self._jitter = TRANSCEIVER_JITTER.create(meter)
        self._loss = TRANSCEIVER_LOSS.create(meter)
        TRANSCEIVER_SESSIONS_MAX.create(meter, [lambda _: [metrics.Observation(max_sessions)]])

    def watch(self, session: WatchedSession, created_at: float) -> None:
        """From the answer on (`created_at`: the monotonic time the session was made)."""
        now = self._clock()
        watch = _Watch(session, now, (now - created_at) * 1000.0)
        self._watches[session.id] = watch
        pc = session.pc

        def on_connection_state() -> None:
            if pc.connectionState == "connected" and not watch.connected:
                watch.connected = True
                elapsed_ms = (self._clock() - watch.answered_at) * 1000.0
                self._setup.record(elapsed_ms, {"stage": "connected"})

        pc.on("connectionstatechange", on_connection_state)
        aiortc_compat.tap_receiver_reports(
            pc, lambda report: self._report(watch, report), self._wall_clock
        )

    def closed(self, session_id: str) -> None:
        watch = self._watches.pop(session_id, None)
        if watch is not None:
            self._note_first_audio(watch)

    def _report(self, watch: _Watch, report: aiortc_compat.ReceiverReport) -> None:
        sample = link_sample(report)
        self._loss.record(sample.loss_ratio)
        self._jitter.record(sample.jitter_ms)
        if sample.rtt_ms is not None:
            self._rtt.record(sample.rtt_ms)
        self._note_first_audio(watch)

    def _note_first_audio(self, watch: _Watch) -> None:
        # The session stamps its first caller audio itself; it is recorded here at the next
        # receiver report (or the close), which keeps this off the per-packet path.
        ttfa_ms = watch.session.ttfa_in_ms
        if watch.first_audio or not ttfa_ms:
            return
        watch.first_audio = True
        self._setup.record(max(0.0, ttfa_ms - watch.negotiate_ms), {"stage": "first_audio"})
