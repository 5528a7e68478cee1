"""The call metrics: values from real RTCP receiver reports (known fraction lost, jitter,
LSR/DLSR) through aiortc's own parse and dispatch, and from a real call through the
in-process transceiver (set-up time, RTT, capacity).

Its own test target: it installs the process' global meter provider, which the
transceiver test kit's SessionManager uses."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtp import RtcpPacket, RtcpReceiverInfo, RtcpRrPacket
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from services.transceiver import aiortc_compat
from services.transceiver.call_metrics import CallMetrics, link_sample
from services.transceiver.transceiver_testing import Client, Stack, wait_for

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
        sender = pc.addTransceiver("audio").sender
        # Our last sender report: LSR 0x12345678 left at wall time 1000.0.
        lsr_name, lsr_time_name = aiortc_compat.SENDER_RTT_ATTRIBUTES
        setattr(sender, lsr_name, 0x12345678)
        setattr(sender, lsr_time_name, 1000.0)
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
