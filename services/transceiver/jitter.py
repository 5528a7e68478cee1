"""The caller's adaptive jitter buffer: RTP packets in, in any order; one 20 ms slot out per
tick. Pure: the clock is handed in, nothing here touches sockets or the loop.

What a tick returns (`Slot.kind`):
- FRAME: the packet whose turn it is (its own, or a RED copy of it: `from_red`);
- LOST: the packet never came in time; `fec` is the next packet when it is already here
  (its Opus in-band FEC, LBRR, may carry this frame: RFC 6716 §2.1.7);
- SILENCE: the caller sent nothing for this 20 ms on purpose: a timestamp jump with no
  sequence gap, or Opus DTX (a packet of at most 2 bytes, RFC 6716 §3.1: a TOC and no
  frame data), and the silence that follows one;
- None: nothing yet (before the first packet has waited its delay).

Delay: every packet's transit (arrival minus its RTP time) is compared with the fastest
one seen (`base`, which creeps up slowly so a path that got slower is followed); the
excess over it is held by a peak that decays (half-life `DECAY_HALF_LIFE_S`) and climbs
by at most a frame per 20 ms (a burst after a stall is not jitter). A packet read while
the loop is behind (the tick due before it has not run yet) moves no estimate: it may have
waited in the socket, and the loop's own delay is no jitter. A late packet still counts. The target
delay is that peak plus a margin (plus one frame for `LOSS_MEMORY_S` after a packet was
missing, so that the next packet, with the lost frame's FEC, is here in time), within
[min_delay_ms, max_delay_ms].

Playout: `tick(at)` plays the slot due at `at` (the pacer's grid, so ticks that run late
back to back each play their own slot). `tick(at, late=True)` (the loop is behind: the
slot's packet may be unread in the socket) plays nothing when the packet is not here and
returns DEFERRED; the caller asks again once the loop has read. The cursor (the RTP time
of the next slot) plays `lead` after base. Every change of the delay is a frame more or
less in what the bridge hears, so it changes only when it must:
- grow: only when the cursor's packet is missing and the lead is short of the target
  (the slot is held: concealed without advancing); a packet that is here plays, however
  short the lead;
- shrink: when the lead has exceeded the target by `SHRINK_MARGIN_S`, a slot that costs
  nothing is skipped (silence, a packet that is missing anyway, or a pause in the speech:
  a packet at most `QUIET_RATIO` of the mean size, since Opus VBR spends few bytes where
  nothing is said), or after `SKIP_AFTER_TICKS` ticks in a row of it, a frame of speech;
- after an underrun (nothing here, the cursor ran on), a packet more than `STALE_TICKS`
  behind the cursor is late: a stall of the network costs its frames, not a lasting
  delay. A packet that comes after its slot was played is counted `late` and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

OPUS_CLOCK_HZ = 48000
FRAME_TICKS = 960  # one 20 ms frame in RTP ticks (RFC 7587 §4.1: a 48 kHz clock)
FRAME_S = 0.02
DECAY_HALF_LIFE_S = 2.0
MARGIN_S = 0.015  # over the measured peak: a busy loop reads packets and runs ticks late
BASE_CREEP_PER_S = 0.005  # how fast the fastest-transit reference forgets (5 ms per s)
LOSS_MEMORY_S = 10.0  # after a loss, the target keeps room for the next packet's FEC this long
SHRINK_MARGIN_S = 0.03  # spare delay over the target before a frame is skipped
SKIP_AFTER_TICKS = 150  # in speech, that much spare delay for 3 s before a frame is skipped
QUIET_RATIO = 0.5  # a packet at most this share of the mean size is a pause (VBR: no speech)
SIZE_AVERAGE_PACKETS = 32  # the mean packet size follows the last ~32 packets
STALE_TICKS = FRAME_TICKS  # after an underrun, a packet this far behind the cursor still plays
# Stale packets dropped in a row before the buffer follows them instead: the sender's clock
# fell behind (a stalled sender resumes with contiguous timestamps), it is no burst.
STALE_RUN_MAX = 10
DTX_MAX_BYTES = 2  # Opus DTX / comfort-noise packets: a TOC byte and at most one more

FRAME, LOST, SILENCE = 0, 1, 2


class Slot(NamedTuple):
    kind: int  # FRAME, LOST or SILENCE
    payload: bytes | None = None  # FRAME: the Opus packet (or one DTX packet, then SILENCE)
    fec: bytes | None = None  # LOST: the next packet, for in-band FEC
    from_red: bool = False  # FRAME: recovered from a RED block (RFC 2198)
    # FRAME/SILENCE: slots just played as LOST while nothing was here that, this packet's
    # sequence number shows, were a pause of the sender (no packet missing): silence
    paused: int = 0
    held: bool = False  # LOST/SILENCE: no packet is missing, the buffer grows by this slot
    duration: int = FRAME_TICKS  # FRAME: the packet's length in 48 kHz ticks (its TOC)


def opus_duration_ticks(packet: bytes) -> int:
    """Duration of an Opus packet in 48 kHz ticks from its TOC (RFC 6716 §3.1); 960 when
    it cannot be read."""
    if not packet:
        return FRAME_TICKS
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # Hybrid: 10, 20 ms
        frame = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        count = 1
    elif code < 3:
        count = 2
    else:
        count = packet[1] & 0x3F if len(packet) > 1 else 1
    return max(frame, min(frame * count, 5760))  # 120 ms at most


_DECAY_PER_S = math.log(2) / DECAY_HALF_LIFE_S
_exp = math.exp
_SILENCE_SLOT = Slot(SILENCE)
_LOST_SLOT = Slot(LOST)
_HELD_LOST = Slot(LOST, held=True)
_HELD_SILENCE = Slot(SILENCE, held=True)
# What tick(late=True) returns when the slot's packet is not here: nothing was played.
DEFERRED = Slot(LOST)
_WRAP = 1 << 32
_HALF_WRAP = 1 << 31


class JitterBuffer:
    """One caller stream's reordering buffer with an adapting delay (module docstring).
    `push` per packet (extended RTP sequence number), `tick` once per 20 ms."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        min_delay_ms: float = 20.0,
        max_delay_ms: float = 200.0,
        capacity_frames: int = 64,
    ) -> None:
        self._clock = clock  # seconds, monotonic
        self._last_at = math.inf  # when the last slot was due (its tick's time)
        self._min_delay = min_delay_ms / 1000.0
        self._max_delay = max(min_delay_ms, max_delay_ms) / 1000.0
        self._capacity = capacity_frames
        # sequence -> (payload, unwrapped RTP timestamp, from RED, duration in ticks, when
        # it arrived (None: from RED)); the TOC is read once, here
        self._frames: dict[int, tuple[bytes, int, bool, int, float | None]] = {}
        self._next_seq: int | None = None  # None until the first slot is played
        self._cursor = 0  # unwrapped RTP time of the next slot
        self._last_ts: int | None = None  # unwrapped timestamp of the newest packet
        self._base: float | None = None  # fastest transit seen (creeping up)
        self._base_at = 0.0
        self._peak = 0.0  # decaying peak of transit over base, seconds
        self._peak_at = 0.0
        self._rise_at = -math.inf  # when the peak last climbed
        self._in_silence = False
        self._size_mean = 0.0  # of the caller's packets (VBR): small ones are pauses
        self._over_ticks = 0  # ticks in a row with spare delay over the target
        self._loss_at = -LOSS_MEMORY_S  # when a packet was last missing at its slot
        self._underrun = 0  # LOST slots played since the last packet, while none was here
        self._stale_run = 0  # packets dropped as stale since a packet last played
        self.late = 0  # packets that came after their slot was played
        self.duplicates = 0
        self.overflow = 0  # packets beyond capacity_frames ahead of the cursor
        self.skipped = 0  # frames dropped to shrink the delay
        self.held = 0  # slots concealed to grow the delay
        self.delay_ms = 0.0  # how long the last FRAME waited here (arrival to release)
        self._delay_sum_ms = 0.0
        self._delayed = 0

    @property
    def target_ms(self) -> float:
        """The delay the buffer aims for now."""
        return self._target(self._clock()) * 1000.0

    @property
    def mean_delay_ms(self) -> float:
        """How long the FRAMEs played so far waited here, on average."""
        return self._delay_sum_ms / self._delayed if self._delayed else 0.0

    @property
    def buffered(self) -> int:
        return len(self._frames)

    def _unwrap(self, timestamp: int) -> int:
        last = self._last_ts
        if last is None:
            return timestamp
        delta = (timestamp - last) % _WRAP
        if delta >= _HALF_WRAP:
            delta -= _WRAP
        return last + delta

    def _target(self, now: float) -> float:
        peak = self._peak
        since = now - self._peak_at
        if since > 0.0:
            peak *= _exp(-since * _DECAY_PER_S)
        if now - self._loss_at < LOSS_MEMORY_S:
            peak += FRAME_S  # a lost frame's FEC is in the next packet: wait for it too
        target = peak + MARGIN_S
        if target < self._min_delay:
            return self._min_delay
        return target if target < self._max_delay else self._max_delay

    def push(self, payload: bytes, timestamp: int, sequence: int, from_red: bool = False) -> None:
        """One packet (RTP timestamp, extended sequence number) as it arrives; a RED block
        (`from_red`) fills only a slot still empty and moves no estimate."""
        next_seq = self._next_seq
        if next_seq is not None and sequence < next_seq:
            if not from_red:
                self.late += 1  # its slot was played: dropped, but its lateness counts
                self._measure(self._unwrap(timestamp))
            return
        frames = self._frames
        held = frames.get(sequence)
        if held is not None and (from_red or not held[2]):
            if not from_red:
                self.duplicates += 1
            return  # a RED copy of what is here, or a duplicate
        if next_seq is not None and sequence >= next_seq + self._capacity:
            self.overflow += 1
            return
        last = self._last_ts
        if last is None:
            ts = timestamp
        else:
            delta = (timestamp - last) % _WRAP
            ts = last + delta if delta < _HALF_WRAP else last + delta - _WRAP
        if from_red:
            frames[sequence] = (payload, ts, True, opus_duration_ticks(payload), None)
            return
        if last is None or ts > last:
            self._last_ts = ts
        size = len(payload)
        if size > DTX_MAX_BYTES:
            mean = self._size_mean
            self._size_mean = mean + (size - mean) / SIZE_AVERAGE_PACKETS if mean else size
        frames[sequence] = (payload, ts, False, opus_duration_ticks(payload), self._measure(ts))

    def _measure(self, ts: int) -> float:
        """The transit of a packet with (unwrapped) timestamp `ts` arriving now, into the
        base and the peak; returns now."""
        now = self._clock()
        due = self._last_at + FRAME_S
        base = self._base
        if now > due and base is not None:
            # The loop is behind (the tick due then has not run yet): the packet is in time
            # for that tick whatever the loop's delay, so that delay is no jitter. When it
            # really came is unknown (it may have waited in the socket): it moves nothing.
            return due
        transit = now - ts / OPUS_CLOCK_HZ
        if base is None:
            base = transit
        else:
            base += (now - self._base_at) * BASE_CREEP_PER_S
            if transit < base:
                base = transit
        self._base, self._base_at = base, now
        excess = transit - base
        peak = self._peak
        since = now - self._peak_at
        if since > 0.0:
            peak *= _exp(-since * _DECAY_PER_S)
        if excess > peak and now - self._rise_at >= FRAME_S:
            # At most a frame per 20 ms: a burst after a stall (one instant, the first
            # packet of it the latest) raises the peak by a frame, not by the stall, and
            # jitter that lasts still gets there within a few packets.
            peak = excess if excess < peak + FRAME_S else peak + FRAME_S
            self._rise_at = now
        self._peak, self._peak_at = peak, now
        return now

    def tick(self, at: float | None = None, *, late: bool = False) -> Slot | None:
        """The next 20 ms slot (module docstring), or None before playing starts. `at`: the
        time this slot is due on the pacer's grid (default: the clock); a late timer that
        runs several slots back to back hands each its own time, so a stall of the loop
        neither skips nor holds a frame. `late`: the loop runs behind, the slot's packet
        may be unread in the socket: when it is not here, DEFERRED (nothing played, call
        again for the same slot once the loop has read)."""
        frames = self._frames
        base = self._base
        if base is None:
            return None
        now = self._clock() if at is None else at
        target = self._target(now)
        if self._next_seq is None:
            first = min(frames)
            ts = frames[first][1]
            if now - base - ts / OPUS_CLOCK_HZ < target:
                return None
            self._next_seq, self._cursor = first, ts
        lead = now - base - self._cursor / OPUS_CLOCK_HZ
        missing = self._next_seq not in frames and not self._due_here()
        if missing and late:
            return DEFERRED
        self._last_at = now
        if missing and lead < self._wait_for_missing(now, target):
            # Its packet may still come: this slot waits a tick (the buffer grows).
            self.held += 1
            self._over_ticks = 0
            if not self._frames:
                self._underrun += 1  # nothing here: as much a pause as the slots after it
            return _HELD_SILENCE if self._in_silence else _HELD_LOST
        if lead <= target + SHRINK_MARGIN_S:
            self._over_ticks = 0
            return self._release(now)
        self._over_ticks += 1
        if (
            self._in_silence
            or missing
            or self._quiet_here()
            or self._over_ticks >= SKIP_AFTER_TICKS
        ):
            # Shrink by the slot that costs least: silence, a frame that is missing
            # anyway (nothing to conceal), a pause in the speech (a small packet), or,
            # after a long stretch of spare delay, speech.
            self._over_ticks = 0
            self.skipped += 1
            self._advance_skipping()
        return self._release(now)

    def _due_here(self) -> bool:
        """The packet of the cursor's slot (or one whose time has come) is here."""
        frames = self._frames
        seq = self._next_seq
        if seq in frames:
            return True
        return bool(frames) and frames[min(frames)][1] <= self._cursor

    def _quiet_here(self) -> bool:
        """The cursor's packet is a pause in the speech: much smaller than the mean (Opus
        VBR spends few bytes where there is nothing to say)."""
        held = self._frames.get(self._next_seq)  # type: ignore[arg-type]
        return held is not None and len(held[0]) <= QUIET_RATIO * self._size_mean

    def _wait_for_missing(self, now: float, target: float) -> float:
        """How much lead a missing packet is waited for: its own lateness (the peak), and
        when the next packet is not here either, room for that one's FEC too."""
        seq = self._next_seq
        assert seq is not None
        if self._in_silence or (seq + 1) in self._frames:
            return target - FRAME_S / 2
        return target

    def _advance_skipping(self) -> None:
        """Drops the cursor's frame (or 20 ms of a silence) to shrink the delay."""
        seq = self._next_seq
        assert seq is not None
        held = self._frames.get(seq)
        if held is not None and held[1] <= self._cursor:
            del self._frames[seq]
            self._next_seq = seq + 1
            self._cursor = held[1] + held[3]
        elif self._in_silence or held is not None:
            self._cursor += FRAME_TICKS  # 20 ms of a pause (the next packet is later)
        else:
            self._next_seq = seq + 1  # a missing packet: never concealed, never waited for
            self._cursor += FRAME_TICKS
            self._loss_at = self._peak_at

    def _drop_stale(self) -> None:
        """The cursor ran on through an underrun: packets whose slot is more than
        `STALE_TICKS` behind it now are late (dropped, counted). So one stall of the network
        grows the buffer by a frame at most, instead of by its length (what followed would
        be that much later, until skipped frames won it back). After `STALE_RUN_MAX` of them
        in a row the packets are not a burst but a sender whose clock fell behind: the
        buffer plays them (its delay grows by the slip, shed later like any spare delay)
        instead of dropping every packet from then on."""
        frames = self._frames
        limit = self._cursor - STALE_TICKS
        while frames and self._stale_run < STALE_RUN_MAX:
            first = min(frames)
            if frames[first][1] >= limit:
                return
            del frames[first]
            self.late += 1
            self._stale_run += 1
            if self._next_seq is not None and first >= self._next_seq:
                self._next_seq = first + 1

    def _release(self, now: float) -> Slot:
        frames = self._frames
        seq = self._next_seq
        assert seq is not None
        if self._underrun and frames:
            self._drop_stale()
            seq = self._next_seq
            assert seq is not None
        held = frames.get(seq)
        paused = self._underrun
        if held is None and frames:
            first = min(frames)
            if frames[first][1] <= self._cursor:
                # Its slot has come: the ones before it were played as concealment while
                # nothing was here (an underrun).
                seq = self._next_seq = first
                held = frames[first]
                paused = 0
        if held is None:
            if not frames:
                # Underrun: nothing here. After silence it is more silence; otherwise lost
                # (which the next packet's sequence number will confirm or not).
                self._cursor += FRAME_TICKS
                if self._in_silence:
                    return _SILENCE_SLOT
                self._underrun += 1
                return _LOST_SLOT
            self._underrun = 0
            self._next_seq = seq + 1
            self._cursor += FRAME_TICKS
            self._loss_at = now
            following = frames.get(seq + 1)
            self._in_silence = False
            return Slot(LOST, fec=following[0] if following is not None else None)
        payload, ts, from_red, duration, arrived = held
        self._underrun = 0
        if ts < self._cursor - FRAME_TICKS // 2:
            paused = 0  # it is older than the slots played meanwhile: the network stalled
        if ts - self._cursor >= FRAME_TICKS:
            self._in_silence = True  # the sender skipped time (DTX): silence until ts
            self._cursor += FRAME_TICKS
            return Slot(SILENCE, paused=paused) if paused else _SILENCE_SLOT
        del frames[seq]
        self._stale_run = 0
        if arrived is not None:
            self.delay_ms = (now - arrived) * 1000.0
            self._delay_sum_ms += self.delay_ms
            self._delayed += 1
        self._next_seq = seq + 1
        self._cursor = ts + duration
        if len(payload) <= DTX_MAX_BYTES:
            self._in_silence = True
            return Slot(SILENCE, payload, paused=paused)
        self._in_silence = False
        return Slot(FRAME, payload, None, from_red, paused, False, duration)


RedBlock = tuple[int, int, bytes]  # (timestamp offset, payload type, data)


def red_blocks(payload: bytes) -> list[RedBlock] | None:
    """The blocks of an RFC 2198 (RED) payload, oldest first and the primary (offset 0)
    last, or None when it is malformed. §3: a 4-byte header per redundant block (F=1,
    block PT, 14-bit timestamp offset, 10-bit length), a 1-byte header for the primary
    (F=0, PT), then the blocks' data in the same order."""
    headers: list[tuple[int, int, int]] = []
    index, size = 0, len(payload)
    while True:
        if index >= size:
            return None
        first = payload[index]
        if not first & 0x80:
            headers.append((0, first & 0x7F, -1))
            index += 1
            break
        if index + 4 > size:
            return None
        offset = (payload[index + 1] << 6) | (payload[index + 2] >> 2)
        length = ((payload[index + 2] & 0x03) << 8) | payload[index + 3]
        headers.append((offset, first & 0x7F, length))
        index += 4
    blocks: list[RedBlock] = []
    for offset, payload_type, length in headers:
        end = size if length < 0 else index + length
        if end > size:
            return None
        blocks.append((offset, payload_type, payload[index:end]))
        index = end
    return blocks
