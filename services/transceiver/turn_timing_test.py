"""The turn timer as a pure state machine: a fake clock, bridge messages, playout counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from services.transceiver.turn_timing import DeliveryHistory, TimedBridge, TurnLatency, TurnTimer
from voiceedge.inference.v1 import inference_pb2

Resp = inference_pb2.StreamSessionResponse


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Counters:
    frames_played: int = 0
    queued: int = 0
    clears: int = 0


class Link:
    """A BridgeSession stand-in: records what CallerAudio hands it."""

    address = "bridge:1"
    accepted: inference_pb2.SessionAccepted | None = None

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.skipped = 0

    async def open(self, start: inference_pb2.SessionStart, timeout_s: float) -> None: ...

    async def read_loop(self, on_message: Callable[[Resp], None]) -> None: ...

    def send_audio(self, data: bytes, samples: int) -> None:
        self.sent.append(samples)

    def skip_audio(self, frames: int, samples_per_frame: int) -> None:
        self.skipped += frames

    def send_event(self, text: str) -> None: ...

    def send_report(self, report: inference_pb2.PlayoutReport) -> None: ...

    async def close(self, reason: int, detail: str, *, notify: bool) -> None: ...


def stopped(audio_end_ms: int) -> Resp:
    return Resp(speech_stopped=inference_pb2.SpeechStopped(audio_end_ms=audio_end_ms))


AUDIO = Resp(audio_frame=inference_pb2.AudioFrame(data=bytes(960)))
STARTED = Resp(speech_started=inference_pb2.SpeechStarted(audio_start_ms=0))


def deliver(clock: Clock, frames: int, bridge: TimedBridge) -> None:
    """`frames` 20 ms frames at 24 kHz, one every 20 ms, each stamped as it ends."""
    for _ in range(frames):
        clock.now += 0.02
        bridge.send_audio(bytes(960), 480)


@pytest.mark.parametrize(
    ("audio_ms", "expected"),
    [
        (20.0, 1.02),  # the first frame's end: when it went out
        (30.0, 1.03),  # inside the second frame: its stamp less the 10 ms after it
        (100.0, 1.10),
        (0.0, 1.0),
        (101.0, None),  # not delivered yet
    ],
)
def test_history_maps_media_time_to_when_it_was_live(
    audio_ms: float, expected: float | None
) -> None:
    history = DeliveryHistory(frames=8)
    for index in range(5):
        history.add(20.0, 1.0 + 0.02 * (index + 1))
    found = history.time_of(audio_ms)
    assert found == (None if expected is None else pytest.approx(expected))


def test_history_forgets_the_oldest_and_restarts_with_a_new_stream() -> None:
    history = DeliveryHistory(frames=4)
    for index in range(10):
        history.add(20.0, float(index))
    assert history.time_of(200.0) == 9.0
    assert history.time_of(140.0) == 6.0  # the oldest frame still remembered
    assert history.time_of(130.0) == pytest.approx(5.99)
    assert history.time_of(119.0) is None  # forgotten
    history.reset()
    assert history.time_of(20.0) is None
    history.add(20.0, 50.0)
    assert history.time_of(20.0) == 50.0


def test_a_turn_in_three_parts() -> None:
    clock = Clock()
    timer = TurnTimer(clock)
    seen: list[TurnLatency] = []
    timer.on_turn = seen.append
    link = Link()
    bridge = timer.tap(link, 24000)
    deliver(clock, 50, bridge)  # 1 s of caller audio; frame 50 ends at 1000 ms
    assert link.sent == [480] * 50
    speech_end = clock.now
    deliver(clock, 30, bridge)  # the end-of-turn silence
    clock.now += 0.004  # gRPC back
    counters = Counters(frames_played=7, queued=2)  # the tail of an earlier answer queued
    timer.bridge_message(stopped(1000), counters)
    stopped_at = clock.now
    clock.now += 0.25  # the model thinks
    timer.bridge_message(AUDIO, counters)
    timer.bridge_message(AUDIO, counters)  # later frames of the answer change nothing
    clock.now += 0.02
    counters.frames_played, counters.queued = 8, 3
    timer.played(counters)  # the earlier answer's frames go out first
    clock.now += 0.02
    counters.frames_played = 9
    timer.played(counters)
    assert seen == []
    clock.now += 0.02
    counters.frames_played = 10
    timer.played(counters)  # frame 10: the first of this answer
    (turn,) = seen
    assert turn.index == 1
    assert turn.end_of_turn_s == pytest.approx(stopped_at - speech_end)
    assert turn.end_of_turn_s == pytest.approx(0.604)
    assert turn.bridge_s == pytest.approx(0.25)
    assert turn.playout_s == pytest.approx(0.06)
    assert turn.voice_to_voice_s == pytest.approx(0.914)
    assert timer.voice_to_voice_s == [pytest.approx(0.914)]
    counters.frames_played = 11
    timer.played(counters)
    assert len(seen) == 1  # once per turn


def test_media_time_counts_what_the_bridge_got_not_the_gaps() -> None:
    clock = Clock()
    timer = TurnTimer(clock)
    link = Link()
    bridge = timer.tap(link, 48000)  # passthrough: Opus at the 48 kHz RTP clock
    bridge.send_audio(b"x", 960)
    bridge.skip_audio(3, 960)
    bridge.send_audio(b"x", 960)
    assert link.skipped == 3
    assert timer.history.audio_ms == pytest.approx(40.0)


@pytest.mark.parametrize("ending", ["speech_started", "cleared", "next_turn", "new_stream"])
def test_turns_without_a_played_answer_are_abandoned(ending: str) -> None:
    clock = Clock()
    timer = TurnTimer(clock)
    seen: list[TurnLatency] = []
    timer.on_turn = seen.append
    bridge = timer.tap(Link(), 24000)
    deliver(clock, 50, bridge)
    counters = Counters()
    timer.bridge_message(stopped(600), counters)
    timer.bridge_message(AUDIO, counters)
    if ending == "speech_started":
        timer.bridge_message(STARTED, counters)  # the caller spoke again first
    elif ending == "cleared":
        counters.clears += 1  # the answer was cleared before it played
    elif ending == "next_turn":
        timer.bridge_message(stopped(900), counters)
    else:
        timer.tap(Link(), 24000)
    counters.frames_played = 1
    timer.played(counters)
    assert seen == []
    assert timer.abandoned == 1
    assert timer.turns == (2 if ending == "next_turn" else 1)


def test_an_end_the_history_does_not_hold_is_unmatched() -> None:
    clock = Clock()
    timer = TurnTimer(clock)
    bridge = timer.tap(Link(), 24000)
    deliver(clock, 5, bridge)
    timer.bridge_message(stopped(5000), Counters())  # beyond the audio sent
    timer.bridge_message(AUDIO, Counters())
    timer.played(Counters(frames_played=1))
    assert (timer.turns, timer.unmatched, timer.voice_to_voice_s) == (1, 1, [])
