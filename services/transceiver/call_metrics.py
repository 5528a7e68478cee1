"""What the transceiver's sessions tell operators, beside the session counters in manager.py:
call set-up time, first-hop RTT, jitter and loss, capacity, per-turn latency (histograms and
one OpenTelemetry `turn` span per turn) and, at each call's end, the call record.

RTT, jitter and loss come from the caller's RTCP receiver reports on our audio (RFC 3550
§6.4.1), one sample per report block (about one a second per call): the caller measures
what our packets met on the first hop (transceiver, relay, caller), and the report's
LSR/DLSR give the round trip without clock sync. aiortc parses the reports and keeps only
a smoothed RTT; `aiortc_compat.tap_receiver_reports` hands each block here as it comes.

Turns: each session's `TurnTimer` (turn_timing.py) hands its completed turns here.

The call record, once per session at its close: one `call.record` log line (duration, close
reason, turns, p50/p95 voice-to-voice, RTT, jitter and loss both ways, concealed and
FEC-recovered caller frames, the E-model R-factor and MOS of call_quality.py) and the same
facts as the call_* metrics. The score takes the worse direction: the caller's receiver
reports (what our audio met) against our own receiver (what the caller's met, lost frames
that in-band FEC rebuilt not counted as lost).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import metrics, trace

from libs.observability.metrics import (
    TRANSCEIVER_CALL_DURATION,
    TRANSCEIVER_CALL_QUALITY,
    TRANSCEIVER_CALL_SETUP_DURATION,
    TRANSCEIVER_CALL_TURNS,
    TRANSCEIVER_CALL_VOICE_TO_VOICE,
    TRANSCEIVER_CALLER_FRAMES_REPAIRED,
    TRANSCEIVER_JITTER,
    TRANSCEIVER_LOSS,
    TRANSCEIVER_RTT,
    TRANSCEIVER_SESSIONS_MAX,
    TRANSCEIVER_TURN_STAGE,
    TRANSCEIVER_TURN_VOICE_TO_VOICE,
)
from libs.observability.telemetry import log_event
from services.transceiver import aiortc_compat
from services.transceiver.call_quality import call_quality, percentile
from services.transceiver.media import OPUS_CLOCK_HZ
from services.transceiver.turn_timing import TurnLatency, TurnTimer
from voiceedge.common.v1 import common_pb2

logger = logging.getLogger("voiceedge.transceiver.calls")

RECORDS_KEPT = 100

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


@dataclass(frozen=True)
class InboundAudio:
    """The caller's audio on its way in, as the session's receiver and decoder saw it."""

    packets: int = 0
    lost: int = 0
    jitter_ms: float = 0.0
    frames_concealed: int = 0
    frames_fec_recovered: int = 0

    @property
    def loss_ratio(self) -> float:
        """Lost packets the bridge missed (those FEC rebuilt are not) over those expected."""
        expected = self.packets + self.lost
        return max(0, self.lost - self.frames_fec_recovered) / expected if expected else 0.0


class WatchedSession(Protocol):
    """What the metrics read of a session (session.Session has all of it)."""

    @property
    def id(self) -> str: ...

    @property
    def pc(self) -> Any: ...

    @property
    def ttfa_in_ms(self) -> float: ...  # created to the caller's first audio; 0 before

    @property
    def turns(self) -> TurnTimer: ...

    @property
    def close_reason(self) -> int: ...

    @property
    def created_at(self) -> float: ...  # wall clock

    @property
    def closed_at(self) -> float | None: ...  # wall clock; None while open

    @property
    def inbound(self) -> InboundAudio: ...


@dataclass
class _Link:
    """The caller's receiver reports of one call, summed for its record; the last round
    trips kept for the first-hop RTT geosteer hears (`CallMetrics.first_hop_rtt_ms`)."""

    reports: int = 0
    loss_sum: float = 0.0
    jitter_sum_ms: float = 0.0
    rtts: int = 0
    rtt_sum_ms: float = 0.0
    recent_rtts_ms: deque[float] = field(default_factory=deque)  # bounded by its maker

    def add(self, sample: LinkSample) -> None:
        self.reports += 1
        self.loss_sum += sample.loss_ratio
        self.jitter_sum_ms += sample.jitter_ms
        if sample.rtt_ms is not None:
            self.rtts += 1
            self.rtt_sum_ms += sample.rtt_ms
            self.recent_rtts_ms.append(sample.rtt_ms)


@dataclass
class _Watch:
    session: WatchedSession
    answered_at: float  # monotonic
    negotiate_ms: float  # session created to answer returned
    connected: bool = False
    first_audio: bool = False
    link: _Link = field(default_factory=_Link)


@dataclass(frozen=True)
class CallRecord:
    """One call's summary, as logged (`call.record`) and exported at its close."""

    session_id: str
    close_reason: str
    duration_s: float
    turns: int  # answers measured
    turns_abandoned: int  # the caller spoke again, or the answer was cleared, before it played
    turns_unmatched: int  # SpeechStopped with an audio_end_ms the history did not hold
    voice_to_voice_p50_ms: float | None
    voice_to_voice_p95_ms: float | None
    rtt_ms: float | None  # mean of the caller's reports' round trips
    jitter_ms: float  # mean jitter of our audio at the caller
    loss_ratio: float  # mean fraction of our audio lost on the way to the caller
    inbound_jitter_ms: float
    inbound_loss_ratio: float
    frames_concealed: int
    frames_fec_recovered: int
    r_factor: float
    mos: float

    def log_fields(self) -> dict[str, Any]:
        """The log line's attributes (`session.id`, `close.reason`, the rest by name)."""
        fields: dict[str, Any] = {
            "session__id": self.session_id,
            "close__reason": self.close_reason,
        }
        for name, value in vars(self).items():
            if name in ("session_id", "close_reason"):
                continue
            fields[name] = round(value, 4) if isinstance(value, float) else value
        return fields


def call_record(session: WatchedSession, link: _Link) -> CallRecord:
    turns = session.turns
    inbound = session.inbound
    closed_at = session.closed_at if session.closed_at is not None else time.time()
    reports = link.reports
    loss = link.loss_sum / reports if reports else 0.0
    jitter_ms = link.jitter_sum_ms / reports if reports else 0.0
    rtt_ms = link.rtt_sum_ms / link.rtts if link.rtts else None
    quality = call_quality(
        max(loss, inbound.loss_ratio), max(jitter_ms, inbound.jitter_ms), rtt_ms or 0.0
    )
    p50 = percentile(turns.voice_to_voice_s, 0.5)
    p95 = percentile(turns.voice_to_voice_s, 0.95)
    return CallRecord(
        session_id=session.id,
        close_reason=common_pb2.CloseReason.Name(session.close_reason),  # type: ignore[arg-type]
        duration_s=max(0.0, closed_at - session.created_at),
        turns=len(turns.voice_to_voice_s),
        turns_abandoned=turns.abandoned,
        turns_unmatched=turns.unmatched,
        voice_to_voice_p50_ms=None if p50 is None else p50 * 1000.0,
        voice_to_voice_p95_ms=None if p95 is None else p95 * 1000.0,
        rtt_ms=rtt_ms,
        jitter_ms=jitter_ms,
        loss_ratio=loss,
        inbound_jitter_ms=inbound.jitter_ms,
        inbound_loss_ratio=inbound.loss_ratio,
        frames_concealed=inbound.frames_concealed,
        frames_fec_recovered=inbound.frames_fec_recovered,
        r_factor=quality.r_factor,
        mos=quality.mos,
    )


class CallMetrics:
    def __init__(
        self,
        meter: metrics.Meter,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,  # RTCP's, for the round trips
        tracer: trace.Tracer | None = None,
        rtt_window: int = 8,
        rtt_min_samples: int = 3,
    ) -> None:
        self._rtt_window = rtt_window
        self._rtt_min_samples = rtt_min_samples
        self._clock = clock
        self._wall_clock = wall_clock
        self._tracer = tracer or trace.get_tracer("voiceedge.transceiver")
        self._watches: dict[str, _Watch] = {}
        self.records: list[CallRecord] = []  # the last RECORDS_KEPT, for tests and tools
        self._setup = TRANSCEIVER_CALL_SETUP_DURATION.create(meter)
        self._rtt = TRANSCEIVER_RTT.create(meter)
        self._jitter = TRANSCEIVER_JITTER.create(meter)
        self._loss = TRANSCEIVER_LOSS.create(meter)
        TRANSCEIVER_SESSIONS_MAX.create(meter, [lambda _: [metrics.Observation(max_sessions)]])
        self._turn_total = TRANSCEIVER_TURN_VOICE_TO_VOICE.create(meter)
        self._turn_stage = TRANSCEIVER_TURN_STAGE.create(meter)
        self._call_duration = TRANSCEIVER_CALL_DURATION.create(meter)
        self._call_turns = TRANSCEIVER_CALL_TURNS.create(meter)
        self._call_voice_to_voice = TRANSCEIVER_CALL_VOICE_TO_VOICE.create(meter)
        self._call_quality = TRANSCEIVER_CALL_QUALITY.create(meter)
        self._repaired = TRANSCEIVER_CALLER_FRAMES_REPAIRED.create(meter)

    def watch(self, session: WatchedSession, created_at: float) -> None:
        """From the answer on (`created_at`: the monotonic time the session was made)."""
        now = self._clock()
        link = _Link(recent_rtts_ms=deque(maxlen=self._rtt_window))
        watch = _Watch(session, now, (now - created_at) * 1000.0, link=link)
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
        session.turns.on_turn = lambda turn: self._turn(session.id, turn)

    def first_hop_rtt_ms(self, session_id: str) -> float:
        """What geosteer hears for the session: the smallest of the caller's last
        `rtt_window` round trips, once `rtt_min_samples` arrived; 0.0 before (or for a
        session not watched). A round trip is the network's plus the delays of both event
        loops, which only add: under load the mean overstates a short first hop several
        times (a 10 ms path measured at 190 ms on a busy machine), the minimum does not."""
        watch = self._watches.get(session_id)
        if watch is None:
            return 0.0
        recent = watch.link.recent_rtts_ms
        if len(recent) < self._rtt_min_samples:
            return 0.0
        return min(recent)

    def closed(self, session_id: str) -> CallRecord | None:
        """The session ended: its call record, logged and exported (None if not watched)."""
        watch = self._watches.pop(session_id, None)
        if watch is None:
            return None
        self._note_first_audio(watch)
        record = call_record(watch.session, watch.link)
        log_event(logger, "call.record", **record.log_fields())
        reason = {"close.reason": record.close_reason}
        self._call_duration.record(record.duration_s, reason)
        self._call_turns.record(record.turns, reason)
        self._call_quality.record(record.mos, reason)
        for quantile, value_ms in (
            ("p50", record.voice_to_voice_p50_ms),
            ("p95", record.voice_to_voice_p95_ms),
        ):
            if value_ms is not None:
                self._call_voice_to_voice.record(value_ms / 1000.0, {"quantile": quantile})
        if record.frames_concealed:
            self._repaired.add(record.frames_concealed, {"repair": "concealed"})
        if record.frames_fec_recovered:
            self._repaired.add(record.frames_fec_recovered, {"repair": "fec"})
        self.records.append(record)
        del self.records[:-RECORDS_KEPT]
        return record

    def _turn(self, session_id: str, turn: TurnLatency) -> None:
        self._turn_total.record(turn.voice_to_voice_s)
        for stage, seconds in (
            ("end_of_turn", turn.end_of_turn_s),
            ("bridge", turn.bridge_s),
            ("playout", turn.playout_s),
        ):
            self._turn_stage.record(seconds, {"stage": stage})
        self._turn_spans(session_id, turn)

    def _turn_spans(self, session_id: str, turn: TurnLatency) -> None:
        """A `turn` span from the speech end to the first packet of the answer, its three
        parts as child spans; made after the fact, at the moments the timer recorded."""
        offset_s = self._wall_clock() - self._clock()

        def ns(monotonic_s: float) -> int:
            return int((monotonic_s + offset_s) * 1e9)

        attributes: dict[str, str | int | float] = {
            "session.id": session_id,
            "turn.index": turn.index,
            "turn.audio_end_ms": turn.audio_end_ms,
            "turn.voice_to_voice_ms": round(turn.voice_to_voice_s * 1000.0, 3),
            "turn.end_of_turn_ms": round(turn.end_of_turn_s * 1000.0, 3),
            "turn.bridge_ms": round(turn.bridge_s * 1000.0, 3),
            "turn.playout_ms": round(turn.playout_s * 1000.0, 3),
        }
        parent = self._tracer.start_span(
            "turn", start_time=ns(turn.speech_end_at), attributes=attributes
        )
        context = trace.set_span_in_context(parent)
        for name, start, end in (
            ("turn.end_of_turn", turn.speech_end_at, turn.stopped_at),
            ("turn.bridge", turn.stopped_at, turn.first_audio_at),
            ("turn.playout", turn.first_audio_at, turn.played_at),
        ):
            child = self._tracer.start_span(
                name, context=context, start_time=ns(start), attributes={"session.id": session_id}
            )
            child.end(end_time=ns(end))
        parent.end(end_time=ns(turn.played_at))

    def _report(self, watch: _Watch, report: aiortc_compat.ReceiverReport) -> None:
        sample = link_sample(report)
        watch.link.add(sample)
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
