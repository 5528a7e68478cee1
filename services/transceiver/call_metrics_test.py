"""The call metrics: values from real RTCP receiver reports (known fraction lost, jitter,
LSR/DLSR) through aiortc's own parse and dispatch, and from a real call through the
in-process transceiver (set-up time, RTT, capacity).

Its own test target: it installs the process' global meter provider, which the
transceiver test kit's SessionManager uses."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtp import RtcpPacket, RtcpReceiverInfo, RtcpRrPacket
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.transceiver import aiortc_compat
from services.transceiver.call_metrics import CallMetrics, InboundAudio, link_sample
from services.transceiver.transceiver_testing import Client, Stack, wait_for
from services.transceiver.turn_timing import TurnLatency, TurnTimer
from voiceedge.common.v1 import common_pb2

READER = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


KIT_SCOPE = "voiceedge.transceiver"  # the meter SessionManager uses when given none
TEST_SCOPE = "test"


def _points(name: str, scope: str) -> list[Any]:
    data = READER.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for resource in data.resource_metrics
        for scoped in resource.scope_metrics
        if scoped.scope.name == scope
        for metric in scoped.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def _histogram(name: str, scope: str = TEST_SCOPE, **labels: str) -> HistogramDataPoint | None:
    for point in _points(name, scope):
        if dict(point.attributes or {}) == labels:
            assert isinstance(point, HistogramDataPoint)
            return point
    return None


@dataclass
class _Session:
    id: str
    pc: RTCPeerConnection
    ttfa_in_ms: float = 0.0
    turns: TurnTimer = field(default_factory=TurnTimer)
    close_reason: int = common_pb2.CLOSE_REASON_CLIENT_HANGUP
    created_at: float = 1000.0
    closed_at: float | None = None
    inbound: InboundAudio = field(default_factory=InboundAudio)


def _sender_after_report(pc: RTCPeerConnection) -> Any:
    """The audio sender, its last sender report LSR 0x12345678 sent at wall time 1000.0."""
    sender = pc.addTransceiver("audio").sender
    lsr_name, lsr_time_name = aiortc_compat.SENDER_RTT_ATTRIBUTES
    setattr(sender, lsr_name, 0x12345678)
    setattr(sender, lsr_time_name, 1000.0)
    return sender


def test_link_sample_units_and_implausible_round_trips() -> None:
    report = aiortc_compat.ReceiverReport(fraction_lost=128, jitter_ticks=960, rtt_s=0.042)
    sample = link_sample(report)
    assert sample.loss_ratio == 0.5
    assert sample.jitter_ms == 20.0
    assert sample.rtt_ms == pytest.approx(42.0)
    assert link_sample(aiortc_compat.ReceiverReport(0, 0, -0.5)).rtt_ms is None
    assert link_sample(aiortc_compat.ReceiverReport(0, 0, 3600.0)).rtt_ms is None
    assert link_sample(aiortc_compat.ReceiverReport(0, 0, None)).rtt_ms is None


@pytest.mark.timeout_s(20)
async def test_a_receiver_report_with_known_loss_jitter_and_lsr() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        sender = _sender_after_report(pc)
        now = {"mono": 50.0}
        calls = CallMetrics(
            metrics.get_meter(TEST_SCOPE),
            max_sessions=7,
            clock=lambda: now["mono"],
            wall_clock=lambda: 1000.25,
        )
        session = _Session("known", pc)
        calls.watch(session, created_at=49.99)
        block = RtcpReceiverInfo(
            ssrc=sender._ssrc,
            fraction_lost=64,  # 25 %
            packets_lost=12,
            highest_sequence=400,
            jitter=240,  # 5 ms at Opus' 48 kHz clock
            lsr=0x12345678,
            dlsr=65536 // 10,  # the caller held it ~100 ms
        )
        other = dataclasses.replace(block, ssrc=sender._ssrc ^ 1, fraction_lost=255)
        data = bytes(RtcpRrPacket(ssrc=0xCAFE, reports=[block, other]))
        (packet,) = RtcpPacket.parse(data)
        session.ttfa_in_ms = 310.0  # first caller audio 310 ms after creation: 300 after answer
        await sender._handle_rtcp_packet(packet)  # how aiortc's DTLS transport delivers it

        loss = _histogram("voiceedge_transceiver_loss_ratio")
        jitter = _histogram("voiceedge_transceiver_jitter_ms")
        rtt = _histogram("voiceedge_transceiver_rtt_ms")
        assert loss is not None
        assert jitter is not None
        assert rtt is not None
        assert (loss.count, loss.sum) == (1, 0.25)  # only the block on our SSRC
        assert (jitter.count, jitter.sum) == (1, 5.0)
        assert rtt.count == 1
        assert rtt.sum == pytest.approx(250.0 - (65536 // 10) / 65.536)
        first_audio = _histogram(
            "voiceedge_transceiver_call_setup_duration_ms", stage="first_audio"
        )
        assert first_audio is not None
        assert first_audio.sum == pytest.approx(300.0)

        # A report whose LSR is not our last sender report's gives no round trip.
        stale = dataclasses.replace(block, lsr=1)
        (packet,) = RtcpPacket.parse(bytes(RtcpRrPacket(ssrc=0xCAFE, reports=[stale])))
        await sender._handle_rtcp_packet(packet)
        rtt = _histogram("voiceedge_transceiver_rtt_ms")
        loss = _histogram("voiceedge_transceiver_loss_ratio")
        assert rtt is not None
        assert rtt.count == 1
        assert loss is not None
        assert loss.count == 2
        calls.closed("known")
    finally:
        await pc.close()


@pytest.mark.timeout_s(20)
async def test_the_first_hop_rtt_is_the_least_of_the_last_round_trips_once_enough_came() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        sender = _sender_after_report(pc)
        wall = [1000.0]
        calls = CallMetrics(
            metrics.get_meter(TEST_SCOPE),
            max_sessions=7,
            wall_clock=lambda: wall[0],
            rtt_window=3,
            rtt_min_samples=2,
        )
        session = _Session("window", pc)
        calls.watch(session, created_at=0.0)
        dlsr = 65536 // 10
        block = RtcpReceiverInfo(
            ssrc=sender._ssrc,
            fraction_lost=0,
            packets_lost=0,
            highest_sequence=400,
            jitter=0,
            lsr=0x12345678,
            dlsr=dlsr,
        )
        seen = []
        # A busy loop's first round trip (190 ms) on a 12 ms path, then the path's own.
        for rtt_ms in (190.0, 40.0, 12.0, 50.0, 60.0, 70.0):
            wall[0] = 1000.0 + dlsr / 65536 + rtt_ms / 1000
            (packet,) = RtcpPacket.parse(bytes(RtcpRrPacket(ssrc=0xCAFE, reports=[block])))
            await sender._handle_rtcp_packet(packet)
            seen.append(round(calls.first_hop_rtt_ms("window"), 3))
        assert seen == [0.0, 40.0, 12.0, 12.0, 12.0, 50.0]
        assert calls.first_hop_rtt_ms("unknown") == 0.0
        calls.closed("window")
        assert calls.first_hop_rtt_ms("window") == 0.0
    finally:
        await pc.close()


@pytest.mark.timeout_s(60)
async def test_a_real_call_records_setup_rtt_and_capacity() -> None:
    stack = await Stack.start(max_sessions=5)
    client = Client(tone_hz=440.0)
    try:
        await stack.connect("m1", client)
        async with asyncio.timeout(10):
            await client.connected.wait()
        # Our sender report, then the caller's receiver report on it: about 1-3 s.
        await wait_for(
            lambda: _histogram("voiceedge_transceiver_rtt_ms", KIT_SCOPE) is not None, 20
        )
        connected = _histogram(
            "voiceedge_transceiver_call_setup_duration_ms", KIT_SCOPE, stage="connected"
        )
        assert connected is not None
        assert connected.count == 1
        assert 0 < connected.sum < 10_000
        rtt = _histogram("voiceedge_transceiver_rtt_ms", KIT_SCOPE)
        assert rtt is not None
        assert 0 <= rtt.sum / rtt.count < 1000
        loss = _histogram("voiceedge_transceiver_loss_ratio", KIT_SCOPE)
        assert loss is not None
        assert loss.sum == 0
        assert [p.value for p in _points("voiceedge_transceiver_sessions_max", KIT_SCOPE)] == [5]
        await wait_for(lambda: client.got_audio.is_set(), 10)
    finally:
        await client.close()
        await stack.stop()


def _turn(index: int, speech_end_at: float, parts_s: tuple[float, float, float]) -> TurnLatency:
    stopped = speech_end_at + parts_s[0]
    first_audio = stopped + parts_s[1]
    return TurnLatency(
        index, 1000 * index, speech_end_at, stopped, first_audio, first_audio + parts_s[2]
    )


@pytest.mark.timeout_s(20)
async def test_turns_make_histograms_and_spans_and_the_close_a_call_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio")
        now = {"mono": 500.0}
        calls = CallMetrics(
            metrics.get_meter("record"),
            max_sessions=1,
            clock=lambda: now["mono"],
            wall_clock=lambda: 2000.0 + now["mono"],
            tracer=provider.get_tracer("test"),
        )
        session = _Session("rec", pc, created_at=1000.0)
        calls.watch(session, created_at=499.0)
        timer = session.turns
        assert timer.on_turn is not None
        # Three turns: voice to voice 0.80, 1.00 and 1.50 s.
        for index, parts in enumerate([(0.6, 0.1, 0.1), (0.7, 0.2, 0.1), (0.7, 0.7, 0.1)], 1):
            turn = _turn(index, 400.0 + index, parts)
            timer.voice_to_voice_s.append(turn.voice_to_voice_s)
            timer.on_turn(turn)
        timer.abandoned = 1
        total = _histogram("voiceedge_transceiver_turn_voice_to_voice_seconds", "record")
        assert total is not None
        assert total.count == 3
        assert total.sum == pytest.approx(3.3)
        bridge = _histogram("voiceedge_transceiver_turn_stage_seconds", "record", stage="bridge")
        assert bridge is not None
        assert bridge.sum == pytest.approx(1.0)

        finished = spans.get_finished_spans()
        assert [s.name for s in finished].count("turn") == 3
        first = [s for s in finished if s.attributes and s.attributes.get("turn.index") == 1]
        parent = next(s for s in first if s.name == "turn")
        children = [s for s in finished if s.parent and s.parent.span_id == parent.context.span_id]
        assert sorted(c.name for c in children) == [
            "turn.bridge",
            "turn.end_of_turn",
            "turn.playout",
        ]
        assert parent.start_time == int((401.0 + 2000.0 + 500.0 - 500.0) * 1e9)
        assert parent.end_time is not None
        assert parent.start_time is not None
        assert (parent.end_time - parent.start_time) / 1e9 == pytest.approx(0.8)
        assert parent.attributes is not None
        assert parent.attributes["session.id"] == "rec"

        session.closed_at = 1065.5
        session.inbound = InboundAudio(
            packets=990, lost=10, jitter_ms=3.0, frames_concealed=8, frames_fec_recovered=2
        )
        with caplog.at_level(logging.INFO, logger="voiceedge.transceiver.calls"):
            record = calls.closed("rec")
        assert record is not None
        assert record.duration_s == pytest.approx(65.5)
        assert record.close_reason == "CLOSE_REASON_CLIENT_HANGUP"
        assert (record.turns, record.turns_abandoned, record.turns_unmatched) == (3, 1, 0)
        assert record.voice_to_voice_p50_ms == pytest.approx(1000.0)
        assert record.voice_to_voice_p95_ms == pytest.approx(1450.0)
        assert record.rtt_ms is None  # no receiver report came
        assert record.inbound_loss_ratio == pytest.approx(0.008)  # 8 of 1000 not rebuilt
        assert (record.frames_concealed, record.frames_fec_recovered) == (8, 2)
        assert 1 <= record.mos < 4.41  # below a lossless call's
        (line,) = [r for r in caplog.records if r.getMessage() == "call.record"]
        kv: dict[str, Any] = line.__dict__["kv"]  # log_event's attributes
        assert kv["session.id"] == "rec"
        assert kv["close.reason"] == "CLOSE_REASON_CLIENT_HANGUP"
        assert kv["turns"] == 3
        assert kv["voice_to_voice_p95_ms"] == pytest.approx(1450.0)
        assert kv["mos"] == round(record.mos, 4)
        labels = {"close.reason": "CLOSE_REASON_CLIENT_HANGUP"}
        duration = _histogram("voiceedge_transceiver_call_duration_seconds", "record", **labels)
        assert duration is not None
        assert duration.sum == pytest.approx(65.5)
        mos = _histogram("voiceedge_transceiver_call_quality_mos", "record", **labels)
        assert mos is not None
        assert mos.sum == pytest.approx(record.mos)
        p95 = _histogram(
            "voiceedge_transceiver_call_voice_to_voice_seconds", "record", quantile="p95"
        )
        assert p95 is not None
        assert p95.sum == pytest.approx(1.45)
        repaired = {
            dict(p.attributes or {})["repair"]: p.value
            for p in _points("voiceedge_transceiver_caller_frames_repaired", "record")
        }
        assert repaired == {"concealed": 8, "fec": 2}
        assert calls.closed("rec") is None  # once
    finally:
        await pc.close()
