"""Playout (bridge audio -> one packet per tick) and the pacer's clock, as pure cores: bursts,
the bound, clears and what they report, cancelled responses, the catch-up rule, no drift."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.transceiver import rtp
from services.transceiver.media import Playout, frame_bytes, silence_packet

RATE = 24000
FRAME = frame_bytes(RATE)


def tone_frame(index: int) -> bytes:
    """A distinct, non-silent 20 ms PCM frame per index (passthrough tests read it back)."""
    return (index % 250 + 1).to_bytes(2, "little") * (FRAME // 2)


def playout(max_frames: int = 1500, prebuffer: int = 0) -> Playout:
    out = Playout(RATE, prebuffer=prebuffer, max_frames=max_frames)
    out.passthrough = True  # payloads come back as they went in: easy to follow
    return out


def play(out: Playout, ticks: int) -> list[bytes]:
    return [out.next_packet() for _ in range(ticks)]


def test_a_burst_up_to_the_bound_plays_whole_one_frame_a_tick() -> None:
    out = playout(max_frames=400)
    frames = [tone_frame(i) for i in range(400)]  # 8 s at once
    for i, frame in enumerate(frames):
        out.push(frame, i)
    assert out.queued == 400
    assert play(out, 400) == frames
    assert out.frames_dropped == 0
    assert out.next_packet() == silence_packet(RATE)


def test_beyond_the_bound_the_newest_frames_drop_counted() -> None:
    out = playout(max_frames=10)
    for i in range(15):
        out.push(tone_frame(i), i)
    assert out.frames_dropped == 5
    assert play(out, 10) == [tone_frame(i) for i in range(10)]  # what plays never jumps


def test_clear_reports_what_was_heard_of_the_current_response() -> None:
    out = playout()
    out.start_response("resp_1")
    for i in range(50):
        out.push(tone_frame(i), i)
    play(out, 12)
    cleared = out.clear()
    assert cleared.frames_dropped == 38
    report = cleared.report
    assert (report.response_id, report.played_ms, report.dropped_ms) == ("resp_1", 240, 760)
    assert report.next_sequence == 12
    # Audio still in flight for the cancelled response never plays...
    for i in range(50, 60):
        out.push(tone_frame(i), i)
    assert out.queued == 0
    assert out.frames_discarded == 10
    # ...the next response's does, and a second clear counts it alone.
    out.start_response("resp_2")
    for i in range(60, 70):
        out.push(tone_frame(i), i)
    assert play(out, 10) == [tone_frame(i) for i in range(60, 70)]
    report = out.clear().report
    assert (report.response_id, report.played_ms, report.dropped_ms) == ("resp_2", 200, 0)
    assert report.next_sequence == 70


def test_a_response_queued_behind_another_counts_only_its_own_frames() -> None:
    out = playout()
    out.start_response("a")
    for i in range(5):
        out.push(tone_frame(i), i)
    out.start_response("b")  # a's tail is still queued
    for i in range(5, 10):
        out.push(tone_frame(i), i)
    play(out, 7)
    report = out.clear().report
    assert (report.response_id, report.played_ms, report.dropped_ms) == ("b", 40, 60)


def test_a_cancelled_response_done_plays_what_is_queued_and_drops_later_audio() -> None:
    out = playout()
    out.start_response("r")
    for i in range(3):
        out.push(tone_frame(i), i)
    out.cancel_response()
    out.push(tone_frame(3), 3)
    assert play(out, 4)[:3] == [tone_frame(i) for i in range(3)]
    assert out.frames_discarded == 1


def test_a_bridge_without_responses_keeps_playing_after_a_clear() -> None:
    out = playout()
    for i in range(5):
        out.push(tone_frame(i), i)
    play(out, 2)
    report = out.clear().report
    assert (report.response_id, report.played_ms) == ("", 40)
    for i in range(5, 8):
        out.push(tone_frame(i), i)
    assert play(out, 3) == [tone_frame(i) for i in range(5, 8)]
    assert out.clear().report.played_ms == 60  # counted from the previous clear


def test_rechunked_pcm_keeps_the_bridge_sequence_and_flush_pads_the_last_words() -> None:
    out = Playout(RATE, prebuffer=0, max_frames=100)
    out.push(bytes(FRAME + FRAME // 2), 0)  # 30 ms: one frame out, half of one pending
    out.push(bytes(FRAME // 4), 1)
    assert out.queued == 1
    out.flush()
    assert out.queued == 2
    out.next_packet()
    assert out.report().next_sequence == 0  # the second chunk began in frame 0
    out.next_packet()
    assert out.report().next_sequence == 1
    out.flush()
    assert out.queued == 0


@pytest.mark.timeout_s(5)
async def test_wait_drained_returns_once_the_last_frame_is_played() -> None:
    out = playout()
    out.push(tone_frame(0), 0)
    out.push(tone_frame(1), 1)
    waiter = asyncio.create_task(out.wait_drained())
    out.next_packet()
    await asyncio.sleep(0)
    assert not waiter.done()
    out.next_packet()
    async with asyncio.timeout(1):
        await waiter


@pytest.mark.parametrize(
    ("sent", "now_frames", "plan"),
    [
        (0, 0.0, rtp.TickPlan(0, 1, 0)),  # the first frame at once
        (1, 1.0, rtp.TickPlan(1, 2, 0)),  # on time
        (1, 0.5, rtp.TickPlan(1, 1, 0)),  # early: nothing due yet
        (2, 6.3, rtp.TickPlan(2, 7, 0)),  # late by 5: all five, back to back
        (2, 11.9, rtp.TickPlan(2, 12, 0)),  # exactly MAX_CATCH_UP_FRAMES behind
        (2, 30.2, rtp.TickPlan(30, 31, 28)),  # a longer stall: the newest only
    ],
)
def test_plan_tick_catch_up_rule(sent: int, now_frames: float, plan: rtp.TickPlan) -> None:
    start = 1000.0
    assert rtp.plan_tick(start, sent, start + now_frames * rtp.FRAME_S + 1e-9) == plan


def test_the_pacer_clock_does_not_drift_over_an_hour_of_late_ticks() -> None:
    """An hour of ticks, each woken up to 15 ms late (and one in 100 stalled 50-300 ms):
    the timer stays on its 20 ms grid and the stream sends exactly one frame per 20 ms of
    its clock, each frame once, in order, skipping only after a stall."""
    generator = random.Random(7)
    origin = start = 12345.678
    index, deadline = 1, origin + rtp.FRAME_S
    sent = skipped = 0
    for _ in range(180_000):
        late = generator.uniform(0, 0.015)
        if generator.random() < 0.01:
            late += generator.uniform(0.05, 0.3)
        now = deadline + late
        plan = rtp.plan_tick(start, sent, now)
        assert plan.first == sent + plan.skipped
        skipped += plan.skipped
        sent = plan.end
        due = int((now - start) / rtp.FRAME_S) + 1
        assert sent == due  # caught up, whatever the lateness
        index, deadline = rtp.next_deadline(origin, index, now)
        assert deadline > now
        assert deadline - now <= rtp.FRAME_S + 1e-9
        assert deadline == origin + index * rtp.FRAME_S  # on the grid: no drift
    assert sent >= 180_000
    assert skipped > 0
