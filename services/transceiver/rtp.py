"""The transceiver's own audio RTP path, beside aiortc (which keeps ICE, DTLS, SCTP, RTCP).

Per packet aiortc runs an asyncio task per sender, builds RtpPacket objects with header
extensions, hops through the DTLS, ICE and aioice layers, and on receipt parses into objects,
feeds a jitter buffer and statistics. Here, once DTLS has keyed SRTP:
- `RtpReceiver`: SRTP unprotect, a header parse with one struct, order check, RFC 3550
  loss and jitter, then the Opus payload to the session. The UDP mux calls it directly.
- `RtpSender`: RFC 3550 header (+ the RFC 8843 mid extension, RFC 8285 one-byte form)
  around a ready Opus packet, SRTP protect, straight to the mux.
- `Pacer`: one timer for every session's 20 ms send clock instead of a task per session.

Pure apart from the callables handed in (protect/unprotect are pylibsrtp's, in C).
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pylibsrtp

from services.transceiver import rtpcore
from services.transceiver.sdp import AudioRtpParams

logger = logging.getLogger("voiceedge.transceiver.rtp")

HEADER = struct.Struct("!BBHII")  # V/P/X/CC, M/PT, sequence, timestamp, SSRC (RFC 3550 §5.1)
VERSION_BITS = 0x80
EXTENSION_BIT = 0x10
PADDING_BIT = 0x20
ONE_BYTE_PROFILE = 0xBEDE  # RFC 8285 §4.2
OPUS_CLOCK_HZ = 48000
SEQ_MOD = 1 << 16
MAX_DROPOUT = 3000  # RFC 3550 A.1: larger forward jumps are still accepted here (restart)
MAX_MISORDER = 100


def mid_extension(extension_id: int, mid: str) -> bytes:
    """RFC 8285 one-byte-header extension block carrying the mid (RFC 8843 §15.1)."""
    value = mid.encode("ascii")
    if not 1 <= extension_id <= 14 or not 1 <= len(value) <= 16:
        raise ValueError(f"mid extension: id {extension_id}, mid {mid!r} do not fit")
    element = bytes([(extension_id << 4) | (len(value) - 1)]) + value
    element += bytes(-len(element) % 4)
    return struct.pack("!HH", ONE_BYTE_PROFILE, len(element) // 4) + element


class RtpError(ValueError):
    """Not an RTP packet we can use; the message names the field."""


def parse(packet: bytes) -> tuple[int, int, int, int, bytes]:
    """(payload type, sequence, timestamp, SSRC, payload) of a clear RTP packet."""
    if len(packet) < HEADER.size:
        raise RtpError(f"{len(packet)} bytes, shorter than the 12-byte header")
    first, second, sequence, timestamp, ssrc = HEADER.unpack_from(packet)
    if first >> 6 != 2:
        raise RtpError(f"version {first >> 6}")
    offset = HEADER.size + 4 * (first & 0x0F)
    end = len(packet)
    if first & EXTENSION_BIT:
        if end < offset + 4:
            raise RtpError("header extension cut short")
        words = (packet[offset + 2] << 8) | packet[offset + 3]
        offset += 4 + 4 * words
    if first & PADDING_BIT:
        end -= packet[-1]
    if offset > end:
        raise RtpError("header, extension and padding longer than the packet")
    return second & 0x7F, sequence, timestamp, ssrc, packet[offset:end]


@dataclass
class ReceiveStats:
    """RFC 3550 A.3 / A.8 figures for the caller's stream."""

    packets: int = 0
    bytes: int = 0
    jitter_ticks: float = 0.0  # in 48 kHz RTP ticks
    dropped_srtp: int = 0
    dropped_malformed: int = 0
    dropped_payload_type: int = 0
    dropped_late: int = 0

    @property
    def jitter_ms(self) -> float:
        return self.jitter_ticks * 1000.0 / OPUS_CLOCK_HZ


PayloadSink = Callable[[bytes, int], None]
# With `reorder`: (payload, RTP timestamp, extended sequence number, is a RED packet), for
# every packet but duplicates of the newest and those MAX_MISORDER or more behind it.
PacketSink = Callable[[bytes, int, int, bool], None]
# on_loss(n): n packets are missing just before the one about to reach the sink
LossSink = Callable[[int], None]
Clock = Callable[[], float]


class _ReceiverCore:
    """The per-packet part of RtpReceiver in Python: the reference for rtpcore.Receiver (C,
    same attributes and rules) and the fallback when that extension is missing."""

    def __init__(
        self,
        srtp: pylibsrtp.Session,
        payload_type: int,
        sink: PayloadSink | PacketSink,
        on_loss: LossSink | None,
        clock: Clock | None,
        reorder: bool = False,
        red_payload_type: int = -1,
    ) -> None:
        self._unprotect = srtp.unprotect
        self._payload_type = payload_type
        self._red_payload_type = red_payload_type
        self._reorder = reorder
        self._sink: Any = sink
        self._on_loss = on_loss
        self._clock = clock or time.monotonic
        self.started = False
        self.base = self.highest = 0  # extended sequence numbers of the first / newest packet
        self.source_ssrc = 0
        self.packets = self.bytes = 0
        self.jitter_ticks = 0.0
        self.dropped_srtp = self.dropped_malformed = 0
        self.dropped_payload_type = self.dropped_late = 0
        self._last_transit: float | None = None

    def datagram(self, data: bytes) -> None:
        try:
            clear = self._unprotect(data)
        except (pylibsrtp.Error, ValueError):  # ValueError: longer than pylibsrtp's buffer
            self.dropped_srtp += 1
            return
        try:
            payload_type, sequence, timestamp, ssrc, payload = parse(clear)
        except RtpError:
            self.dropped_malformed += 1
            return
        red = False
        if payload_type != self._payload_type:
            if payload_type != self._red_payload_type:
                self.dropped_payload_type += 1
                return
            red = True
        if not self.started:
            self.started = True
            self.base = self.highest = sequence
            self.source_ssrc = ssrc
            extended = sequence
        else:
            delta = (sequence - self.highest) % SEQ_MOD
            if delta == 0 or (delta > SEQ_MOD - MAX_MISORDER and not self._reorder):
                self.dropped_late += 1
                return
            if delta > SEQ_MOD - MAX_MISORDER:  # older than the newest: the buffer reorders
                extended = self.highest - (SEQ_MOD - delta)
            else:
                self.highest += delta
                extended = self.highest
                if delta > 1 and self._on_loss is not None and not self._reorder:
                    self._on_loss(delta - 1)
        self.packets += 1
        self.bytes += len(payload)
        transit = self._clock() * OPUS_CLOCK_HZ - timestamp
        if self._last_transit is not None:
            difference = abs(transit - self._last_transit)
            if difference < 1 << 30:  # not a timestamp wrap or a new stream
                self.jitter_ticks += (difference - self.jitter_ticks) / 16.0
        self._last_transit = transit
        if self._reorder:
            self._sink(payload, timestamp, extended, red)
        else:
            self._sink(payload, timestamp)


class RtpReceiver:
    """SRTP in, Opus payloads out in arrival order. By default packets older than the newest
    one seen (reordered or duplicated) are dropped and counted, and a sequence gap calls
    `on_loss` (the `direct` receive path). With `reorder` (the `adaptive` path: a jitter
    buffer after it) every packet up to MAX_MISORDER behind the newest goes to the sink
    with its extended sequence number (`PacketSink`), `on_loss` is not called, and
    packets of `red_payload_type` (RFC 2198, -1: none) pass too, flagged. `datagram` is the
    per-packet entry: rtpcore's C receiver when the extension is there (`native`), else
    _ReceiverCore."""

    def __init__(
        self,
        srtp: pylibsrtp.Session,
        payload_type: int,
        sink: PayloadSink | PacketSink,
        clock: Clock | None = None,
        on_loss: LossSink | None = None,
        *,
        native: bool = True,
        reorder: bool = False,
        red_payload_type: int = -1,
    ) -> None:
        args = (srtp, payload_type, sink, on_loss, clock, reorder, red_payload_type)
        core = rtpcore.receiver(*args) if native else None
        self.native = core is not None
        self._core: Any = core if core is not None else _ReceiverCore(*args)
        self.datagram: Callable[[bytes], None] = self._core.datagram
        self._expected_prior = 0
        self._received_prior = 0

    @property
    def stats(self) -> ReceiveStats:
        core = self._core
        return ReceiveStats(
            packets=core.packets,
            bytes=core.bytes,
            jitter_ticks=core.jitter_ticks,
            dropped_srtp=core.dropped_srtp,
            dropped_malformed=core.dropped_malformed,
            dropped_payload_type=core.dropped_payload_type,
            dropped_late=core.dropped_late,
        )

    @property
    def source_ssrc(self) -> int | None:
        return int(self._core.source_ssrc) if self._core.started else None

    @property
    def expected(self) -> int:
        """Packets expected so far (RFC 3550 A.3): extended highest sequence - first + 1."""
        core = self._core
        return int(core.highest - core.base + 1) if core.started else 0

    @property
    def lost(self) -> int:
        """Packets expected and never received (duplicates can make it negative; shown as 0)."""
        return max(0, self.expected - int(self._core.packets))

    def receiver_report(self, reporter_ssrc: int, lsr: int, dlsr: int) -> bytes | None:
        """An RTCP receiver report (RFC 3550 §6.4.2, one report block) on what arrived so
        far, or None before the first packet. `lsr`/`dlsr`: the middle 32 bits of the last
        sender report's NTP time and the delay since it in 1/65536 s (0, 0 without one)."""
        source = self.source_ssrc
        if source is None:
            return None
        core = self._core
        packets = int(core.packets)
        expected = self.expected
        expected_interval = expected - self._expected_prior
        received_interval = packets - self._received_prior
        self._expected_prior, self._received_prior = expected, packets
        lost_interval = expected_interval - received_interval
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = min(255, (lost_interval << 8) // expected_interval)
        cumulative = max(-(1 << 23), min((1 << 23) - 1, expected - packets))
        return RECEIVER_REPORT.pack(
            0x81,  # V=2, P=0, RC=1
            201,  # RR
            7,  # length in 32-bit words minus one
            reporter_ssrc,
            source,
            (fraction << 24) | (cumulative & 0xFFFFFF),
            int(core.highest) & 0xFFFFFFFF,
            int(core.jitter_ticks) & 0xFFFFFFFF,
            lsr & 0xFFFFFFFF,
            dlsr & 0xFFFFFFFF,
        )


RECEIVER_REPORT = struct.Struct("!BBHIIIIIII")

# (RTP timestamp, packets, octets) after each packet: what RTCP sender reports need
# (RFC 3550 §6.4.1).
SenderReportSink = Callable[[int, int, int], None]


REPORT_SAMPLE_EVERY = 5  # packets between samples for RTCP sender reports (100 ms)


class _SenderCore:
    """The per-packet part of RtpSender in Python: the reference for rtpcore.Sender (C) and
    the fallback without it."""

    def __init__(
        self,
        srtp: pylibsrtp.Session,
        payload_type: int,
        ssrc: int,
        extension: bytes,
        timestamp_origin: int,
        sequence: int,
        send: Callable[[bytes], None],
        on_sent: SenderReportSink | None,
    ) -> None:
        self._protect = srtp.protect
        self._send = send
        self._on_sent = on_sent
        self._payload_type = payload_type
        self._ssrc = ssrc
        self._extension = extension
        self._first_byte = VERSION_BITS | (EXTENSION_BIT if extension else 0)
        self._timestamp_origin = timestamp_origin
        self.sequence = sequence
        self.packets = 0
        self.octets = 0

    def send(self, payload: bytes, frame_index: int, ticks_per_frame: int) -> None:
        timestamp = (self._timestamp_origin + frame_index * ticks_per_frame) & 0xFFFFFFFF
        marker = 0x80 if self.packets == 0 else 0  # first packet of a talkspurt (RFC 3551 §4.1)
        header = HEADER.pack(
            self._first_byte, marker | self._payload_type, self.sequence, timestamp, self._ssrc
        )
        self._send(self._protect(header + self._extension + payload))
        self.sequence = (self.sequence + 1) % SEQ_MOD
        self.packets += 1
        self.octets += len(payload)
        if self._on_sent is not None and self.packets % REPORT_SAMPLE_EVERY == 1:
            # Sender reports go out every 0.5-1.5 s; a sample of this packet's timestamp
            # with its counts every 100 ms keeps them consistent (RFC 3550 §6.4.1 pairs
            # the RTP and NTP times of one instant) at a tenth of the cost.
            self._on_sent(timestamp, self.packets, self.octets)


class RtpSender:
    """One outbound stream: a ready Opus packet per 20 ms tick -> SRTP -> `send`.
    `send(payload, frame_index, ticks_per_frame)` sends frame `frame_index` (its RTP
    timestamp follows from it, so a skipped tick shows as a gap, RFC 3550 §5.1): rtpcore's
    C sender when the extension is there (`native`), else _SenderCore."""

    def __init__(
        self,
        params: AudioRtpParams,
        srtp: pylibsrtp.Session,
        send: Callable[[bytes], None],
        on_sent: SenderReportSink | None = None,
        *,
        native: bool = True,
    ) -> None:
        extension = (
            mid_extension(params.mid_extension_id, params.mid)
            if params.mid_extension_id and params.mid
            else b""
        )
        origin, sequence = random.randrange(1 << 32), random.randrange(SEQ_MOD)
        args = (srtp, params.payload_type, params.ssrc, extension, origin, sequence, send, on_sent)
        core = rtpcore.sender(*args) if native else None
        self.native = core is not None
        self._core: Any = core if core is not None else _SenderCore(*args)
        self.send: Callable[[bytes, int, int], None] = self._core.send

    @property
    def sequence(self) -> int:
        """The sequence number of the next packet."""
        return int(self._core.sequence)

    @property
    def packets(self) -> int:
        return int(self._core.packets)

    @property
    def octets(self) -> int:
        return int(self._core.octets)


class Paced(Protocol):
    """A stream the pacer drives: `tick(frame_index, due)` sends that frame; `due` is when
    it was due on the pacer's grid (loop time: the timer that should have sent it), so a
    tick that runs late knows by how much. Frame indexes the pacer skipped (plan_tick,
    after a long stall) never come: a stream that must account for every 20 ms (the
    receive path) sees the jump and the due time of each skipped frame follows from it."""

    def tick(self, frame_index: int, due: float) -> None: ...


FRAME_S = 0.02
MAX_CATCH_UP_FRAMES = 10  # after a longer stall the stream skips ahead instead of bursting
GRID_GUARD_S = 0.001  # a stream's frame clock runs this far ahead of the pacer's grid


@dataclass(frozen=True)
class TickPlan:
    """What one tick sends for one stream: frames `first` to `end - 1` (each its own RTP
    timestamp, 960 apart), after skipping `skipped` frames that came due too long ago."""

    first: int
    end: int
    skipped: int


def plan_tick(start: float, sent: int, now: float) -> TickPlan:
    """The frames a stream started at `start` with `sent` frames sent owes at `now`.

    Frame n is due at `start + n * FRAME_S`, whatever the ticks before did, so a stream
    never drifts from its own clock. The catch-up rule for a loop that was late: when at
    most MAX_CATCH_UP_FRAMES (200 ms) came due, they all go out in this tick, back to back,
    each with its own timestamp (a caller's jitter buffer absorbs that); after a longer
    stall only the newest one goes out and the others are skipped, never sent: the RTP
    timestamp jumps by them (RFC 3550 §5.1; the caller conceals the gap, as it would have
    for packets that arrive too late to play). A skipped frame consumes no audio: the
    queue plays on from where it was, later."""
    due = int((now - start) / FRAME_S) + 1
    skipped = due - sent - 1 if due - sent > MAX_CATCH_UP_FRAMES else 0
    return TickPlan(sent + skipped, max(due, sent), skipped)


def next_deadline(origin: float, ticks: int, now: float) -> tuple[int, float]:
    """The pacer's next timer: the first point of its 20 ms grid (`origin + k * FRAME_S`,
    k > `ticks`) after `now`, as (k, time). On the grid, not `now + FRAME_S`: a late tick
    does not push every later one back, so the timer keeps its phase for hours (k is an
    integer, so no float error adds up either)."""
    k = ticks + 1
    at = origin + k * FRAME_S
    if at <= now:
        k = int((now - origin) / FRAME_S) + 1
        at = origin + k * FRAME_S
    return k, at


class Pacer:
    """One loop timer on a 20 ms grid for every registered stream (deadline-based: see
    next_deadline). Each stream keeps its own frame clock, on the grid from the first tick
    after it was added (frame n is due n x 20 ms after that tick, and `tick` is told when),
    and sends exactly one packet per 20 ms of it; a late tick follows plan_tick's catch-up
    rule."""

    def __init__(
        self,
        before_tick: Callable[[], None] | None = None,
        after_tick: Callable[[], None] | None = None,
    ) -> None:
        # before/after: around every tick (the mux holds sends, then flushes them batched).
        self._before = before_tick
        self._after = after_tick
        self._streams: dict[Paced, tuple[float, int]] = {}  # stream -> (start, frames sent)
        self.failed_streams = 0
        self._handle: asyncio.TimerHandle | None = None
        self._origin = 0.0  # the grid: ticks at origin + k * FRAME_S
        self._grid_index = 0
        self._next_at = 0.0
        self.ticks = 0
        self.late_ticks = 0
        self.skipped_frames = 0

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: Paced) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._handle is None:
            self._origin = now
            self._grid_index = 1
            self._next_at = self._origin + FRAME_S
            self._handle = loop.call_at(self._next_at, self._tick)
        # Frame 0 is due at the grid's next tick; the stream's clock starts a hair before
        # it, so float rounding in plan_tick never moves a frame to the tick after its own,
        # and a late tick sends only the frames whose time has come.
        first_due = self._origin + (int((now - self._origin) / FRAME_S) + 1) * FRAME_S
        self._streams[stream] = (first_due - GRID_GUARD_S, 0)

    def remove(self, stream: Paced) -> None:
        self._streams.pop(stream, None)
        if not self._streams and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self._streams.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.ticks += 1
        if now - self._next_at > FRAME_S:
            self.late_ticks += 1
        if self._before is not None:
            self._before()
        try:
            for stream, (start, sent) in list(self._streams.items()):
                plan = plan_tick(start, sent, now)
                self.skipped_frames += plan.skipped
                sent = plan.first
                try:
                    while sent < plan.end:
                        stream.tick(sent, start + GRID_GUARD_S + sent * FRAME_S)
                        sent += 1
                except Exception:  # one stream's bug must not silence every other stream
                    logger.exception("pacer.stream_failed")
                    self.failed_streams += 1
                    self._streams.pop(stream, None)
                    continue
                if stream in self._streams:  # tick() may have closed the session
                    self._streams[stream] = (start, sent)
        finally:
            if self._after is not None:
                self._after()
        if not self._streams:
            self._handle = None
            return
        self._grid_index, self._next_at = next_deadline(self._origin, self._grid_index, now)
        self._handle = loop.call_at(self._next_at, self._tick)
