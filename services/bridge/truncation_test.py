"""conversation.item.truncate from the transceiver's PlayoutReport: the pairing of clears and
reports (TruncationSource), and the realtime adapter using a report over real gRPC."""

from __future__ import annotations

import asyncio

import pytest

from services.bridge.bridge_testing import read_until, serve
from services.bridge.realtime_test import client_event, fake_realtime, open_session, settings
from services.bridge.servicer import BridgeServicer
from services.bridge.truncation import TruncationSource
from voiceedge.inference.v1 import inference_pb2


class Sink:
    def __init__(self) -> None:
        self.truncated: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def __call__(self, item_id: str, audio_end_ms: int) -> None:
        self.truncated.put_nowait((item_id, audio_end_ms))


def report(next_sequence: int) -> inference_pb2.PlayoutReport:
    return inference_pb2.PlayoutReport(response_id="r", next_sequence=next_sequence)


@pytest.mark.timeout_s(10)
async def test_each_report_answers_the_oldest_clear_exactly() -> None:
    sink = Sink()
    source = TruncationSource("s", wait_s=30)
    source.expect("item_a", 10, 999, sink)
    source.expect("", 0, 0, sink)  # a clear with nothing playing: its report is consumed
    source.expect("item_b", 40, 999, sink)
    assert await source.on_report(report(17)) == ("item_a", 140)
    assert await source.on_report(report(0)) is None
    assert await source.on_report(report(30)) == ("item_b", 0)  # none of it was heard
    assert await source.on_report(report(50)) is None  # no clear waiting
    source.expect("item_a", 60, 999, sink)  # item_a again (its late audio): truncated once
    assert await source.on_report(report(61)) is None
    assert source.reported == 2
    assert sink.truncated.empty()
    await source.close()


@pytest.mark.timeout_s(10)
async def test_without_a_report_the_estimate_is_used() -> None:
    sink = Sink()
    source = TruncationSource("s", wait_s=0.05)
    source.expect("item_a", 0, 260, sink)
    async with asyncio.timeout(5):
        assert await sink.truncated.get() == ("item_a", 260)
    assert source.estimated == 1
    assert await source.on_report(report(3)) is None  # too late: given up on
    await source.close()


@pytest.mark.timeout_s(20)
async def test_the_adapter_truncates_at_what_the_transceiver_reports() -> None:
    async with fake_realtime() as (fake, url):
        servicer = BridgeServicer(settings(url))
        async with serve(servicer) as stub:
            call = await open_session(stub)
            await call.write(client_event({"type": "test.barge_in"}))
            await read_until(call, "clear")
            # The transceiver heard 7 frames of item_b (its first frame is sequence 0).
            await call.write(inference_pb2.StreamSessionRequest(playout_report=report(7)))
            await asyncio.wait_for(fake.truncated.wait(), 5)
            (truncate,) = [e for e in fake.received if e["type"] == "conversation.item.truncate"]
            assert (truncate["item_id"], truncate["audio_end_ms"]) == ("item_b", 140)
            call.cancel()
            await asyncio.wait_for(servicer.wait_idle(), 5)
