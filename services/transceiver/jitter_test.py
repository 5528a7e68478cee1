"""jitter.py: the adaptive jitter buffer, driven by simulated networks on a fake clock (a
sender every 20 ms, per-packet delays and losses, a tick every 20 ms at a fixed phase)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from services.transceiver import jitter, media
from services.transceiver.bridge import BridgeSession
from services.transceiver.jitter import FRAME, LOST, SILENCE, JitterBuffer, Slot
from services.transceiver.settings import ReceiveSettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payload(seq: int) -> bytes:
    """A stand-in Opus packet: TOC 0x08 (SILK 20 ms, one frame) and the sequence number."""
    return b"\x08" + seq.to_bytes(4, "big")


def seq_of(packet: bytes) -> int:
    return int.from_bytes(packet[1:5], "big")


@dataclass
class Run:
    slots: list[tuple[float, Slot | None]] = field(default_factory=list)
    delays_ms: list[tuple[float, float]] = field(default_factory=list)  # (time, delay)
    targets_ms: list[tuple[float, float]] = field(default_factory=list)

    def played(self) -> list[Slot]:
        """Every slot from the first one played to the last packet's (the ticks after the
        stream ended are an underrun)."""
        started = [s for _, s in self.slots]
        while started and started[0] is None:
            started.pop(0)
        assert None not in started, "after it started, every tick gives a slot"
        slots = [s for s in started if s is not None]
        while slots and slots[-1].kind != FRAME:
            slots.pop()
        return slots


def simulate(
    buffer: JitterBuffer,
    clock: Clock,
    delays_s: list[float | None],  # per packet: network delay, None = lost
    *,
    timestamps: list[int] | None = None,
    sizes: dict[int, bytes] | None = None,
    tick_phase_s: float = 0.013,
    extra_ticks: int = 20,
) -> Run:
    events: list[tuple[float, int, int]] = []  # (time, 0 arrival / 1 tick, index)
    for seq, delay in enumerate(delays_s):
        if delay is not None:
            events.append((seq * jitter.FRAME_S + delay, 0, seq))
    ticks = len(delays_s) + extra_ticks
    events += [(i * jitter.FRAME_S + tick_phase_s, 1, i) for i in range(ticks)]
    events.sort()
    run = Run()
    for at, kind, index in events:
        clock.now = at
        if kind == 0:
            ts = timestamps[index] if timestamps is not None else index * jitter.FRAME_TICKS
            data = (sizes or {}).get(index, payload(index))
            buffer.push(data, ts & 0xFFFFFFFF, index)
        else:
            slot = buffer.tick()
            run.slots.append((at, slot))
            if slot is not None and slot.kind == FRAME:
                run.delays_ms.append((at, buffer.delay_ms))
            run.targets_ms.append((at, buffer.target_ms))
    return run


def run_after(stalls: list[tuple[float, float]]) -> Callable[[float], float]:
    """When a loop that stalls over `stalls` (start, end) runs what was due at t."""

    def after_stalls(t: float) -> float:
        for start, end in stalls:
            if start <= t < end:
                return end
        return t

    return after_stalls


def test_zero_jitter_plays_every_frame_in_order_with_little_delay() -> None:
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, [0.030] * 500)
    played = run.played()
    frames = [seq_of(s.payload) for s in played if s.kind == FRAME and s.payload]
    assert frames == list(range(500))
    assert max(d for _, d in run.delays_ms) <= 40.0
    assert buffer.late == buffer.skipped == buffer.held == 0


def test_exactly_one_slot_per_tick_once_started() -> None:
    clock = Clock()
    buffer = JitterBuffer(clock)
    rng = random.Random(5)
    delays: list[float | None] = [rng.uniform(0, 0.08) for _ in range(1000)]
    run = simulate(buffer, clock, delays, extra_ticks=0)
    played = run.played()  # asserts no tick without a slot after the first
    assert len(played) >= 1000 - 10  # the start waits for the first frame's delay only


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reordering_and_loss_break_at_most_one_percent(seed: int) -> None:
    """10 % of adjacent packets swapped (the first one 25 ms late, behind the second) and
    5 % lost: a frame is broken when it is neither played from its packet nor lost with
    the next packet here for FEC."""
    rng = random.Random(seed)
    count = 3000
    delays: list[float | None] = [0.030] * count
    for seq in range(count - 1):
        if rng.random() < 0.10 and delays[seq] == 0.030:
            delays[seq] = 0.030 + 0.025  # arrives after seq + 1
    for seq in range(count):
        if rng.random() < 0.05:
            delays[seq] = None
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, delays)
    played = run.played()
    kinds = Counter(s.kind for s in played)
    broken = sum(1 for s in played if s.kind == LOST and s.fec is None)
    assert kinds[FRAME] + kinds[LOST] >= count - 5
    assert broken <= 0.01 * count, (broken, kinds, buffer.late, buffer.held)
    assert max(d for _, d in run.delays_ms) <= 100.0


def test_delay_grows_under_jitter_and_shrinks_back() -> None:
    rng = random.Random(7)
    jittery: list[float | None] = [0.040 + rng.uniform(-0.040, 0.040) for _ in range(1500)]
    calm: list[float | None] = [0.040] * 1500
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, jittery + calm)
    end_jitter = 1500 * jitter.FRAME_S
    during = [t for at, t in run.targets_ms if 10.0 < at < end_jitter]
    assert min(during) >= 50.0  # most of the ±40 ms spread is covered
    late_share = buffer.late / 1500
    assert late_share < 0.01
    # Ten seconds after the jitter stopped the delay is back near the zero-jitter one.
    after = [d for at, d in run.delays_ms if at > end_jitter + 10.0]
    assert after
    assert max(after) <= 40.0
    assert buffer.skipped > 0


def test_timestamp_jump_without_sequence_gap_is_silence_not_loss() -> None:
    # DTX: packets 0-99, then the sender sends nothing for 1 s, then 100-199 continue
    # with the timestamps of real time (sequence numbers contiguous).
    timestamps = [seq * 960 for seq in range(100)] + [(seq + 50) * 960 for seq in range(100, 200)]
    delays: list[float | None] = [0.030] * 200
    events_delays: list[float | None] = delays[:100] + [None] * 50 + delays[100:]
    clock = Clock()
    buffer = JitterBuffer(clock)
    # The sender's clock: packet index i (sequence) is sent at its timestamp's time.
    run = Run()
    schedule: list[tuple[float, int, int]] = []
    for seq, ts in enumerate(timestamps):
        schedule.append((ts / 48000 + 0.030, 0, seq))
    schedule += [(i * 0.02 + 0.013, 1, i) for i in range(len(events_delays) + 10)]
    schedule.sort()
    paused = 0
    for at, kind, index in schedule:
        clock.now = at
        if kind == 0:
            buffer.push(payload(index), timestamps[index], index)
        else:
            slot = buffer.tick()
            run.slots.append((at, slot))
            if slot is not None:
                paused += slot.paused
    played = run.played()
    kinds = Counter(s.kind for s in played)
    assert kinds[FRAME] == 200
    # The pause was played as LOST while nothing was here, and reported as a pause (no
    # packet was missing) by the packet after it.
    assert kinds[LOST] == paused


def test_dtx_packets_and_the_quiet_after_them_are_silence() -> None:
    sizes = {seq: b"\x08" for seq in range(50, 60)}  # 1-byte DTX packets
    delays: list[float | None] = [0.030] * 60 + [None] * 30
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, delays, sizes=sizes, extra_ticks=0)
    kinds = [s.kind for _, s in run.slots if s is not None]
    assert kinds[:50] == [FRAME] * 50
    assert set(kinds[50:]) == {SILENCE}


@pytest.mark.parametrize(
    ("late_seq", "delay_s", "expect_late"),
    [
        (10, 0.030 + 0.015, 0),  # reordered within the delay: played in place
        (10, 0.030 + 0.5, 1),  # after its slot: dropped, counted
    ],
)
def test_a_late_packet_is_played_in_place_or_counted_late(
    late_seq: int, delay_s: float, expect_late: int
) -> None:
    delays: list[float | None] = [0.030] * 100
    delays[late_seq] = delay_s
    clock = Clock()
    buffer = JitterBuffer(clock, min_delay_ms=20.0)
    run = simulate(buffer, clock, delays)
    frames = [seq_of(s.payload) for s in run.played() if s.kind == FRAME and s.payload]
    assert (late_seq in frames) == (expect_late == 0)
    assert buffer.late == expect_late


def test_lost_frame_offers_the_next_packet_for_fec() -> None:
    delays: list[float | None] = [0.030] * 50
    delays[20] = None
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, delays)
    lost = [s for s in run.played() if s.kind == LOST]
    assert len(lost) == 1
    assert lost[0].fec is not None
    assert seq_of(lost[0].fec) == 21


def test_duplicates_and_red_copies_do_not_replace_a_packet() -> None:
    clock = Clock()
    buffer = JitterBuffer(clock)
    buffer.push(payload(0), 0, 0)
    buffer.push(payload(0), 0, 0)
    buffer.push(b"red copy", 0, 0, from_red=True)
    assert buffer.duplicates == 1
    clock.now = 0.02
    buffer.push(b"\x08red1", 960, 1, from_red=True)  # fills an empty slot
    buffer.push(payload(1), 960, 1)  # the real one replaces the RED copy
    clock.now = 0.035
    first, second = buffer.tick(), buffer.tick()
    assert first is not None
    assert first.payload == payload(0)
    assert second is not None
    assert second.payload == payload(1)
    assert not second.from_red


def test_rtp_timestamps_wrap() -> None:
    start = (1 << 32) - 960 * 10
    timestamps = [(start + seq * 960) & 0xFFFFFFFF for seq in range(40)]
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, [0.030] * 40, timestamps=timestamps)
    frames = [seq_of(s.payload) for s in run.played() if s.kind == FRAME and s.payload]
    assert frames == list(range(40))


@pytest.mark.parametrize(
    ("packet", "ticks"),
    [
        (b"", 960),
        (bytes([0x08]), 960),  # SILK WB 20 ms, one frame
        (bytes([0x10 | 0x01]), 3840),  # SILK NB 40 ms, two frames: 80 ms
        (bytes([0x78]), 960),  # Hybrid FB 20 ms
        (bytes([0xF8 | 0x03, 0x03]), 2880),  # CELT FB 20 ms, code 3 with 3 frames
        (bytes([0x80]), 120),  # CELT NB 2.5 ms
    ],
)
def test_opus_duration_from_the_toc(packet: bytes, ticks: int) -> None:
    assert jitter.opus_duration_ticks(packet) == ticks


def red(*blocks: tuple[int, int, bytes]) -> bytes:
    """An RFC 2198 payload: redundant (offset, pt, data) blocks, the last one primary."""
    head = b""
    for offset, pt, data in blocks[:-1]:
        head += bytes([0x80 | pt, offset >> 6, ((offset & 0x3F) << 2) | (len(data) >> 8)])
        head += bytes([len(data) & 0xFF])
    head += bytes([blocks[-1][1]])
    return head + b"".join(data for _, _, data in blocks)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (red((0, 111, b"primary")), [(0, 111, b"primary")]),
        (
            red((1920, 111, b"older"), (960, 111, b"old"), (0, 111, b"new")),
            [(1920, 111, b"older"), (960, 111, b"old"), (0, 111, b"new")],
        ),
        (red((960, 111, b""), (0, 111, b"new")), [(960, 111, b""), (0, 111, b"new")]),
        (b"", None),
        (bytes([0x80 | 111, 0, 0]), None),  # header cut short
        (bytes([0x80 | 111, 15, 0, 9, 111]) + b"abc", None),  # block longer than the data
    ],
)
def test_red_blocks_follow_rfc2198(data: bytes, expected: list[tuple[int, int, bytes]]) -> None:
    assert jitter.red_blocks(data) == expected


def test_a_network_stall_costs_its_frames_not_a_lasting_delay() -> None:
    """The network holds 200 ms of packets and releases them at once (a stalled forwarder):
    their slots were played as concealment, so they are late (dropped), and what follows
    plays at the delay of before: no frame later, none skipped to win it back."""
    delays: list[float | None] = [0.030] * 400
    for seq in range(200, 210):
        delays[seq] = 0.030 + (210 - seq) * jitter.FRAME_S  # all arrive with packet 210
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, delays)
    played = run.played()
    frames = [seq_of(s.payload) for s in played if s.kind == FRAME and s.payload]
    assert frames[-1] == 399
    assert buffer.late >= 8
    assert len(played) <= 400 + 1  # the timeline grew by a frame at most
    assert buffer.skipped == 0
    before = max(d for at, d in run.delays_ms if at < 4.0)
    assert max(d for at, d in run.delays_ms if at > 5.0) <= before + 20.0 + 1.0


def test_a_late_running_loop_neither_holds_nor_skips() -> None:
    """The loop stalls for up to 60 ms twice a second, and once for 400 ms: packets are
    read late, and the ticks due meanwhile run back to back after the stall, each with the
    time it was due (CallerAudio replays the slots the pacer skipped). The buffer plays
    every frame in order, none held, none skipped, its target unmoved."""
    rng = random.Random(11)
    stalls: list[tuple[float, float]] = [(6.0, 6.4)]
    at = 0.0
    while at < 12.0:
        at += rng.expovariate(2.0)
        stalls.append((at, at + rng.uniform(0.005, 0.060)))

    after_stalls = run_after(stalls)

    count = 500
    events: list[tuple[float, int, int, float]] = []  # (run at, 0 packet / 1 tick, index, due)
    for seq in range(count):
        arrival = seq * jitter.FRAME_S + 0.030
        events.append((after_stalls(arrival), 0, seq, arrival))
    for index in range(count + 10):
        due = index * jitter.FRAME_S + 0.013
        events.append((after_stalls(due), 1, index, due))
    events.sort()
    clock = Clock()
    buffer = JitterBuffer(clock)
    slots: list[Slot] = []
    for run_at, kind, index, due in events:
        clock.now = run_at
        if kind == 0:
            buffer.push(payload(index), index * jitter.FRAME_TICKS, index)
        else:
            slot = buffer.tick(due)
            if slot is not None:
                slots.append(slot)
    frames = [seq_of(s.payload) for s in slots if s.kind == FRAME and s.payload]
    assert frames == list(range(count))
    assert buffer.held == buffer.skipped == buffer.late == 0
    assert buffer.target_ms <= 40.0


class PassthroughBridge:
    """A BridgeSession stand-in for CallerAudio in passthrough: keeps every packet."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.gaps = 0

    def send_audio(self, data: bytes, samples: int) -> None:
        self.packets.append(data)

    def skip_audio(self, frames: int, samples_per_frame: int) -> None:
        self.gaps += frames


@pytest.mark.parametrize("seed", [1, 2])
def test_ticks_that_run_before_the_socket_is_read_conceal_nothing(seed: int) -> None:
    """A clean link, and a loop that stalls (10-150 ms, every half second or so). After a
    stall the event loop runs its timers before it reads its sockets: the pacer's ticks
    due meanwhile come first, back to back, each with its due time, and only then the
    packets that came during the stall. Each of those packets was in time: CallerAudio
    defers the slot to the next tick instead of concealing or holding it, so every frame
    reaches the bridge once, in order, and nothing is concealed, held, skipped or late."""
    rng = random.Random(seed)
    stalls: list[tuple[float, float]] = []
    at = 0.5
    while at < 11.0:
        stalls.append((at, at + rng.uniform(0.010, 0.150)))
        at += rng.uniform(0.3, 0.8)

    after_stalls = run_after(stalls)

    count = 500
    # (run at, 0 tick / 1 packet: timers before sockets, index, due)
    events: list[tuple[float, int, int, float]] = []
    for seq in range(count):
        arrival = 1.0 + seq * jitter.FRAME_S + 0.030
        events.append((after_stalls(arrival), 1, seq, arrival))
    for index in range(count + 10):
        due = 1.0 + index * jitter.FRAME_S + 0.013
        events.append((after_stalls(due), 0, index, due))
    events.sort()
    clock = Clock()
    audio = media.CallerAudio(24000, 5, lambda: 0.0, ReceiveSettings(), clock=clock)
    bridge = PassthroughBridge()
    audio.bridge = cast(BridgeSession, bridge)
    audio.passthrough = True
    for run_at, kind, index, due in events:
        clock.now = run_at
        if kind == 1:
            audio.on_packet(payload(index), index * jitter.FRAME_TICKS, index, False)
        else:
            audio.tick(index, due)
            if len(bridge.packets) == count:
                break  # the ticks after the last packet are an underrun
    assert [seq_of(p) for p in bridge.packets] == list(range(count))
    jb = audio.jitter
    assert jb.held == jb.skipped == jb.late == 0
    assert audio.frames_lost == audio.frames_concealed == bridge.gaps == 0


def test_a_sender_whose_clock_fell_behind_is_followed_not_dropped() -> None:
    """The sender stalls for 300 ms and resumes with contiguous timestamps (its audio came
    late, none was skipped): every packet from then on is 300 ms behind the cursor. A few
    are dropped as stale (they could have been a burst), then the buffer follows the new
    timing instead of dropping every packet to the end of the call."""
    count = 600
    delays: list[float | None] = [0.030] * count
    for seq in range(200, count):
        delays[seq] = 0.030 + 0.300
    clock = Clock()
    buffer = JitterBuffer(clock)
    run = simulate(buffer, clock, delays)
    frames = [seq_of(s.payload) for s in run.played() if s.kind == FRAME and s.payload]
    assert frames[-1] == count - 1
    assert len(frames) >= count - jitter.STALE_RUN_MAX - 2
    assert buffer.late <= jitter.STALE_RUN_MAX
