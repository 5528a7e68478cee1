"""Per-turn latency as the transceiver sees it: from the end of the caller's speech to the
first packet of the answer sent to the caller, in three parts.

    speech end ──(end_of_turn)──> SpeechStopped ──(bridge)──> first answer AudioFrame
               ──(playout)──> that frame's first packet sent by the Pacer

- `end_of_turn`: the bridge's SpeechStopped gives `audio_end_ms` in caller-audio media time
  (milliseconds of audio the bridge got on this stream). `TimedBridge` stamps every caller
  frame as it is handed to the bridge; a media time maps to the stamp of the frame holding
  it, less the part of that frame after it (a frame goes out when it ends: the audio at that
  media time was live that much earlier). The wait is that moment to the SpeechStopped's
  arrival here (VAD, the end-of-turn silence, both gRPC hops).
- `bridge`: SpeechStopped to the first AudioFrame after it (the model thinking, TTS).
- `playout`: that frame's arrival to the tick that sent its first packet (the playout
  queue ahead of it, the prebuffer, the wait for the next 20 ms tick).

The sum is the voice-to-voice latency the caller feels, less the network both ways and the
caller's own buffers. A turn ends without a figure (`abandoned`) when the caller speaks
again before the answer plays, or the answer is cleared before its first packet went out;
`unmatched` when `audio_end_ms` is not (or no longer) in the delivery history. Pure but for
the clock, which is injected.
"""

from __future__ import annotations

import dataclasses
import time
from array import array
from collections.abc import Callable
from typing import Protocol

from services.transceiver.bridge import BridgeSession
from voiceedge.inference.v1 import inference_pb2

# Caller frames remembered for the media-time mapping: 20 ms each, 25 s of audio, more than
# the longest end-of-turn silence the bridge allows (10 s + 10 s for short utterances).
HISTORY_FRAMES = 1250


@dataclasses.dataclass(frozen=True)
class TurnLatency:
    """One turn's figures (seconds) and its moments (monotonic seconds)."""

    index: int  # 1, 2, ... per session
    audio_end_ms: int
    speech_end_at: float  # the caller frame ending at audio_end_ms reached the bridge
    stopped_at: float  # SpeechStopped arrived
    first_audio_at: float  # the answer's first AudioFrame arrived
    played_at: float  # its first packet was sent

    @property
    def end_of_turn_s(self) -> float:
        return self.stopped_at - self.speech_end_at

    @property
    def bridge_s(self) -> float:
        return self.first_audio_at - self.stopped_at

    @property
    def playout_s(self) -> float:
        return self.played_at - self.first_audio_at

    @property
    def voice_to_voice_s(self) -> float:
        return self.played_at - self.speech_end_at


@dataclasses.dataclass
class _Pending:
    audio_end_ms: int
    speech_end_at: float
    stopped_at: float
    first_audio_at: float | None = None
    position: int = 0  # frames_played at which the answer's first frame goes out
    clears: int = 0  # the playout's clear count when it was queued


class DeliveryHistory:
    """Media time -> when it reached the bridge: the end (ms of audio so far) and the time of
    each of the last HISTORY_FRAMES caller frames, in two fixed arrays (no per-frame
    allocation; 20 kB a session)."""

    def __init__(self, frames: int = HISTORY_FRAMES) -> None:
        self._ends = array("d", bytes(8 * frames))
        self._times = array("d", bytes(8 * frames))
        self._count = 0
        self._longest_ms = 0.0  # the longest frame: how far before its end the oldest reaches
        self.audio_ms = 0.0

    def reset(self) -> None:
        """A new bridge stream: its media time starts at 0 again."""
        self._count = 0
        self.audio_ms = 0.0

    def add(self, ms: float, at: float) -> None:
        self._longest_ms = max(self._longest_ms, ms)
        self.audio_ms += ms
        slot = self._count % len(self._ends)
        self._ends[slot] = self.audio_ms
        self._times[slot] = at
        self._count += 1

    def time_of(self, audio_ms: float) -> float | None:
        """When the caller's audio at media time `audio_ms` was live, as the bridge had it:
        the frame holding it reached the bridge when the frame ended, so that moment less
        the rest of the frame. None if it is older than the history or not delivered yet."""
        size = len(self._ends)
        oldest = max(0, self._count - size)
        found: tuple[float, float] | None = None  # (end, time) of the frame holding it
        for index in range(self._count - 1, oldest - 1, -1):
            slot = index % size
            end = self._ends[slot]
            if end < audio_ms - 1e-6:
                break
            found = (end, self._times[slot])
        if found is None:
            return None
        end, at = found
        if oldest > 0 and end - audio_ms > self._longest_ms + 1e-6:
            return None  # before the oldest frame remembered: forgotten
        return at - (end - audio_ms) / 1000.0


class TurnTimer:
    """One session's turns. The session feeds it the bridge's messages (`bridge_message`,
    before it acts on them), the playout's counters when a tick played audio (`played`),
    and caller frames through `tap`. Completed turns go to `on_turn`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.history = DeliveryHistory()
        self.on_turn: Callable[[TurnLatency], None] | None = None
        self.voice_to_voice_s: list[float] = []  # completed turns, in order
        self.turns = 0  # SpeechStopped seen
        self.abandoned = 0
        self.unmatched = 0
        self._pending: _Pending | None = None

    def tap(self, bridge: BridgeSession, clock_hz: int) -> TimedBridge:
        """The bridge stream caller audio goes to, with every frame's delivery stamped. A
        new stream (the bridge reconnected) starts the media time again."""
        self.history.reset()
        self._abandon()
        return TimedBridge(bridge, self, clock_hz)

    def delivered(self, ms: float) -> None:
        self.history.add(ms, self._clock())

    def bridge_message(
        self, message: inference_pb2.StreamSessionResponse, playout: PlayoutCounters
    ) -> None:
        kind = message.WhichOneof("payload")
        if kind == "audio_frame":
            pending = self._pending
            if pending is not None and pending.first_audio_at is None:
                pending.first_audio_at = self._clock()
                pending.position = playout.frames_played + playout.queued
                pending.clears = playout.clears
        elif kind == "speech_stopped":
            self._speech_stopped(message.speech_stopped.audio_end_ms)
        elif kind == "speech_started":
            self._abandon()

    def played(self, playout: PlayoutCounters) -> None:
        """A tick just sent a packet of queued audio."""
        pending = self._pending
        if pending is None or pending.first_audio_at is None:
            return
        if playout.clears != pending.clears:
            self._abandon()  # the answer was cleared before its first packet went out
        elif playout.frames_played > pending.position:
            self._pending = None
            self._complete(
                TurnLatency(
                    index=self.turns,
                    audio_end_ms=pending.audio_end_ms,
                    speech_end_at=pending.speech_end_at,
                    stopped_at=pending.stopped_at,
                    first_audio_at=pending.first_audio_at,
                    played_at=self._clock(),
                )
            )

    def _complete(self, turn: TurnLatency) -> None:
        self.voice_to_voice_s.append(turn.voice_to_voice_s)
        if self.on_turn is not None:
            self.on_turn(turn)

    def _speech_stopped(self, audio_end_ms: int) -> None:
        self._abandon()
        self.turns += 1
        now = self._clock()
        speech_end_at = self.history.time_of(audio_end_ms)
        if speech_end_at is None or speech_end_at > now:
            self.unmatched += 1
            return
        self._pending = _Pending(audio_end_ms, speech_end_at, now)

    def _abandon(self) -> None:
        if self._pending is not None:
            self._pending = None
            self.abandoned += 1


class PlayoutCounters(Protocol):
    """What the timer reads of media.Playout."""

    @property
    def frames_played(self) -> int: ...

    @property
    def queued(self) -> int: ...

    @property
    def clears(self) -> int: ...


class TimedBridge:
    """Stands between CallerAudio and its bridge stream (a BridgeSession itself): every frame
    handed over is stamped in the timer's history (its length in ms of media time), then
    passed on. Skipped frames (a gap in the sequence) are not audio the bridge got, so they
    add no media time. Everything else goes straight to the stream."""

    def __init__(self, bridge: BridgeSession, timer: TurnTimer, clock_hz: int) -> None:
        self.bridge = bridge
        self.address = bridge.address
        self.accepted = bridge.accepted
        self._timer = timer
        self._ms_per_sample = 1000.0 / clock_hz

    def send_audio(self, data: bytes, samples: int) -> None:
        self.bridge.send_audio(data, samples)
        self._timer.delivered(samples * self._ms_per_sample)

    def skip_audio(self, frames: int, samples_per_frame: int) -> None:
        self.bridge.skip_audio(frames, samples_per_frame)

    def send_event(self, text: str) -> None:
        self.bridge.send_event(text)

    def send_report(self, report: inference_pb2.PlayoutReport) -> None:
        self.bridge.send_report(report)

    async def open(self, start: inference_pb2.SessionStart, timeout_s: float) -> None:
        await self.bridge.open(start, timeout_s)
        self.accepted = self.bridge.accepted

    async def read_loop(
        self, on_message: Callable[[inference_pb2.StreamSessionResponse], None]
    ) -> None:
        await self.bridge.read_loop(on_message)

    async def close(self, reason: int, detail: str, *, notify: bool) -> None:
        await self.bridge.close(reason, detail, notify=notify)
