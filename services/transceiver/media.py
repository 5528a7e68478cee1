"""Audio between aiortc and the bridge: caller frames -> fixed 20 ms PCM chunks, and bridge
PCM -> a paced outbound queue with a small jitter buffer that barge-in clears at once, and
that knows how much of each response the caller heard."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from opentelemetry import metrics

from libs.observability.metrics import (
    TRANSCEIVER_CALLER_FRAMES,
    TRANSCEIVER_FIRST_WORDS_DROPPED,
)
from services.transceiver import jitter, opus
from services.transceiver.bridge import BridgeSession
from services.transceiver.settings import ReceiveSettings
from voiceedge.inference.v1 import inference_pb2

FRAME_MS = 20
BYTES_PER_SAMPLE = 2  # s16le


def frame_bytes(rate_hz: int, channels: int = 1) -> int:
    return frame_samples(rate_hz) * channels * BYTES_PER_SAMPLE


def frame_samples(rate_hz: int) -> int:
    """Samples per channel in one 20 ms frame."""
    return rate_hz * FRAME_MS // 1000


class Rechunker:
    """Cuts a byte stream into fixed-size chunks, keeping the remainder. Pure."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        self._pending += data
        count = len(self._pending) // self.size
        chunks = [bytes(self._pending[i * self.size : (i + 1) * self.size]) for i in range(count)]
        del self._pending[: count * self.size]
        return chunks

    @property
    def pending(self) -> int:
        return len(self._pending)

    def clear(self) -> None:
        self._pending.clear()


class OpusToPcm:
    """Caller Opus packets -> 20 ms mono s16le chunks at `rate_hz`, on the event loop (no
    thread hop per frame), decoded by libopus at that rate (no resampler)."""

    def __init__(self, rate_hz: int) -> None:
        self._decoder = opus.Decoder(rate_hz)
        self._size = frame_bytes(rate_hz)
        self._chunks = Rechunker(self._size)

    def conceal(self, frames: int) -> list[bytes]:
        """20 ms chunks of concealment for `frames` lost packets (libopus PLC)."""
        out: list[bytes] = []
        for _ in range(frames):
            try:
                out += self._chunks.push(self._decoder.conceal(self._size // 2))
            except opus.OpusError:
                break
        return out

    def recover(self, following: bytes) -> bytes | None:
        """20 ms of the frame lost before `following`, from its in-band FEC (None: the
        decoder refused it)."""
        try:
            pcm = self._decoder.decode_fec(following, self._size // 2)
        except opus.OpusError:
            return None
        return pcm if len(pcm) == self._size else None

    def push(self, packet: bytes) -> list[bytes]:
        try:
            pcm = self._decoder.decode(packet)
        except opus.OpusError:
            return []  # a corrupt packet is skipped, as a lost one would be
        if len(pcm) == self._size and not self._chunks.pending:
            return [pcm]  # the usual 20 ms packet: no copy into the rechunker
        return self._chunks.push(pcm)


OPUS_CLOCK_HZ = 48000  # RTP clock of Opus, whatever the encoded rate (RFC 7587 §4.1)
OPUS_BITRATE = 48000
OPUS_SAMPLES_PER_FRAME = frame_samples(OPUS_CLOCK_HZ)
OPUS_TIME_BASE = fractions.Fraction(1, OPUS_CLOCK_HZ)  # built once, not per packet


@dataclass(frozen=True)
class EncoderOptions:
    """libopus encoder choices for the audio we send (RFC 6716 modes follow from them).

    Defaults measured on the dev machine (BENCHMARKS.md, transceiver): "audio" at complexity
    5 encodes a 20 ms 24 kHz frame in ~50 us, "voip" at complexity 10 (libopus' default, its
    SILK speech path) in ~200 us, at the same 48 kbit/s."""

    application: str = "audio"
    complexity: int = 5


class OpusPacketizer:
    """PCM (mono s16le, 20 ms) -> one Opus packet, with our own libopus encoder.

    Why not aiortc's encoder: it resamples every frame to 48 kHz stereo, hops to a thread,
    and computes an audio level in pure Python; and a track that yields packets lets gaps
    be filled with a ready-made silence packet at no cost."""

    def __init__(self, rate_hz: int, options: EncoderOptions | None = None) -> None:
        options = options or EncoderOptions()
        self.rate_hz = rate_hz
        self.samples = frame_samples(rate_hz)
        self._encoder = opus.Encoder(rate_hz, options.application, OPUS_BITRATE, options.complexity)

    def encode(self, pcm: bytes) -> bytes | None:
        try:
            return self._encoder.encode(pcm, self.samples)
        except (opus.OpusError, ValueError):
            return None  # the caller plays silence instead

    def after_silence(self, frames: int = 2) -> None:
        """Brings the encoder to where the caller's decoder is after our ready-made silence
        packets (another encoder's): Opus codes each frame's band energies relative to the
        previous frame's (RFC 6716 §4.3.2.1), so without this the first packets of audio
        after a gap decoded 25-40 dB too quiet (measured: the first 20-60 ms of every answer)."""
        silence = bytes(self.samples * BYTES_PER_SAMPLE)
        for _ in range(frames):
            self.encode(silence)


_SILENCE: dict[int, bytes] = {}


def silence_packet(rate_hz: int) -> bytes:
    """An Opus packet of 20 ms digital silence, encoded once per rate."""
    packet = _SILENCE.get(rate_hz)
    if packet is None:
        encoder = OpusPacketizer(rate_hz)
        zeros = bytes(frame_bytes(rate_hz))
        for _ in range(5):  # past the encoder's look-ahead
            packet = encoder.encode(zeros) or packet
        assert packet is not None
        _SILENCE[rate_hz] = packet
    return packet


class IdleTrack(MediaStreamTrack):
    """The track aiortc's RTCRtpSender holds so the answer is sendrecv and its RTCP runs;
    it never yields (our `rtp.RtpSender` sends the audio), so aiortc's per-session sender
    task sleeps until the track stops."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._stopped = asyncio.Event()

    async def recv(self) -> av.Packet[Any]:
        await self._stopped.wait()
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self._stopped.set()


@dataclass(frozen=True)
class Cleared:
    """What a clear did: every queued frame it dropped, and the report for the bridge."""

    frames_dropped: int
    report: inference_pb2.PlayoutReport


class Playout:
    """Outbound audio, one Opus packet per 20 ms tick (`next_packet`). Bridge audio queues
    here; playout starts once `prebuffer` frames are queued or the first one has waited
    that long, and a silence packet fills gaps.

    The queue holds `max_frames` (settings: `playout_queue_max_s`, 30 s): a burst of any
    size up to that plays whole, at 20 ms a frame; beyond it the newest frames are dropped
    and counted (`frames_dropped`): what is playing never jumps. `clear()` drops everything
    queued (barge-in) and says what the caller heard of the current response
    (`PlayoutReport`, inference.proto): the response of the last `start_response`, whose
    frames are told apart by stream order. Once the bridge uses responses, audio after a
    clear (or after `cancel_response`) belongs to the cancelled response and is dropped
    (`frames_discarded`) until the next `start_response`."""

    def __init__(
        self,
        rate_hz: int,
        *,
        prebuffer: int,
        max_frames: int,
        on_first_audio: Callable[[], None] | None = None,
        encoder: EncoderOptions | None = None,
    ) -> None:
        self.passthrough = False  # True: the queue holds Opus packets from the bridge
        self._encoder_options = encoder or EncoderOptions()
        self.rate_hz = rate_hz
        self._chunks = Rechunker(frame_bytes(rate_hz))
        # (payload, the bridge's AudioFrame.sequence it began in, response generation)
        self._queue: deque[tuple[bytes, int, int]] = deque()
        self._max_frames = max_frames
        self._prebuffer = prebuffer
        self._first_queued_at: float | None = None
        self._playing = False
        self._encoder = OpusPacketizer(rate_hz, self._encoder_options)
        self._silence = silence_packet(rate_hz)
        self._on_first_audio = on_first_audio
        self._drained = asyncio.Event()
        self._drained.set()
        # The current response: frames queued under its generation count as its own.
        self._generation = 0
        self._response_id = ""
        self._responses_used = False  # the bridge has sent a ResponseStarted
        self._discarding = False  # the current response was cancelled: drop its audio
        self._played_in_response = 0
        self._pending_sequence = 0  # bridge sequence the rechunker's partial frame began in
        self._next_sequence = 0  # bridge sequence after the last frame played
        self.frames_played = 0
        self.frames_dropped = 0  # the queue was full
        self.frames_discarded = 0  # audio of a cancelled response
        self.clears = 0

    def set_rate(self, rate_hz: int) -> None:
        """The bridge's output rate, known once it accepted; before any audio is queued."""
        if rate_hz == self.rate_hz:
            return
        self._queue.clear()
        self.rate_hz = rate_hz
        self._chunks = Rechunker(frame_bytes(rate_hz))
        self._encoder = OpusPacketizer(rate_hz, self._encoder_options)
        self._silence = silence_packet(rate_hz)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def push(self, pcm: bytes, sequence: int = 0) -> None:
        """Queues bridge audio: PCM at rate_hz (any length), or one Opus packet in
        passthrough mode; `sequence` is its AudioFrame.sequence."""
        if self._discarding:
            self.frames_discarded += 1
            return
        queue = self._queue
        was_empty = not queue
        if self.passthrough or (len(pcm) == self._chunks.size and not self._chunks.pending):
            entries = [(pcm, sequence)]  # the usual whole 20 ms frame: no rechunking
        else:
            begun_in = self._pending_sequence if self._chunks.pending else sequence
            chunks = self._chunks.push(pcm)
            entries = [(chunk, begun_in if i == 0 else sequence) for i, chunk in enumerate(chunks)]
            if self._chunks.pending:
                self._pending_sequence = sequence if chunks else begun_in
        generation = self._generation
        for chunk, begun in entries:
            if len(queue) >= self._max_frames:
                self.frames_dropped += 1
                continue
            queue.append((chunk, begun, generation))
        if queue and was_empty:
            self._drained.clear()
            if self._first_queued_at is None:
                self._first_queued_at = time.monotonic()

    def flush(self) -> None:
        """Queues the partial last frame, padded with silence (the bridge's last words)."""
        pending = self._chunks.pending
        if pending and not self.passthrough and not self._discarding:
            self.push(bytes(self._chunks.size - pending), self._pending_sequence)

    async def wait_drained(self) -> None:
        """Until every queued frame has been played (or cleared)."""
        await self._drained.wait()

    def start_response(self, response_id: str) -> None:
        """A ResponseStarted: the audio that follows is this response's."""
        self._responses_used = True
        self._discarding = False
        self._response_id = response_id
        self._generation += 1
        self._played_in_response = 0

    def cancel_response(self) -> None:
        """A cancelled ResponseDone: what is queued still plays, later audio is dropped."""
        if self._responses_used:
            self._discarding = True

    def report(self) -> inference_pb2.PlayoutReport:
        """What the caller has heard of the current response so far."""
        generation = self._generation
        unplayed = sum(1 for entry in self._queue if entry[2] == generation)
        if self._queue:
            next_sequence = self._queue[0][1]
        elif self._chunks.pending:
            next_sequence = self._pending_sequence
        else:
            next_sequence = self._next_sequence
        return inference_pb2.PlayoutReport(
            response_id=self._response_id,
            played_ms=self._played_in_response * FRAME_MS,
            dropped_ms=unplayed * FRAME_MS,
            next_sequence=next_sequence,
        )

    def clear(self) -> Cleared:
        """Barge-in: drops everything queued; the current response is cancelled (see the
        class docstring), or, for a bridge without responses, the counts start again."""
        report = self.report()
        dropped = len(self._queue)
        self._queue.clear()
        self._chunks.clear()
        self._first_queued_at = None
        self._playing = False
        self._drained.set()
        self.clears += 1
        if self._responses_used:
            self._discarding = True
        else:
            self._generation += 1
            self._played_in_response = 0
        return Cleared(dropped, report)

    def next_packet(self) -> bytes:
        queue = self._queue
        if not self._playing and queue:
            waited = time.monotonic() - (self._first_queued_at or 0.0)
            if len(queue) >= self._prebuffer or waited >= self._prebuffer * FRAME_MS / 1000:
                self._playing = True
                if not self.passthrough:
                    self._encoder.after_silence()  # the caller heard silence packets until now
        if self._playing and queue:
            payload, sequence, generation = queue.popleft()
            if not queue:
                self._first_queued_at = None
                self._drained.set()
            if generation == self._generation:
                self._played_in_response += 1
            self._next_sequence = sequence + 1
            if self.frames_played == 0 and self._on_first_audio is not None:
                self._on_first_audio()
            self.frames_played += 1
            if self.passthrough:
                return payload
            return self._encoder.encode(payload) or self._silence
        self._playing = False
        return self._silence


class CallerAudio:
    """Caller Opus packets -> the bridge, on one of two receive paths (`receive_path`).

    direct: `on_opus` per packet in arrival order (rtp.RtpReceiver drops late ones),
    decoded to 20 ms PCM at the session's rate or passed through; lost packets (`on_loss`,
    a sequence gap) become libopus PLC for up to `concealment_max_frames` of them, the rest
    (and every lost frame in passthrough) a gap in AudioFrame.sequence, as inference.proto
    says. Nothing goes out until `bridge` is set (the bridge accepted).

    adaptive: `on_packet` per packet in any order into a jitter buffer (jitter.py), `tick`
    (the pacer, every 20 ms) takes one slot out: its packet; a lost one from the next
    packet's in-band FEC, or a RED copy, else PLC (up to `concealment_max_frames` in a row,
    then zero PCM: a PCM bridge gets exactly one frame per 20 ms, no sequence gaps);
    silence (DTX, a timestamp jump) as zero PCM, or in passthrough the caller's DTX packet
    or a ready-made Opus silence packet. Passthrough lost frames are sequence gaps (the
    bridge's decoder conceals, with the next packet's FEC). Until
    the bridge accepted, slots wait (at most `first_words_max_s`, the oldest dropping and
    counted) and are delivered in order once it has, decoded then (whether it takes PCM
    or Opus is known only then). Nothing goes out after `stop()`."""

    def __init__(
        self,
        rate_hz: int,
        concealment_max_frames: int,
        elapsed_ms: Callable[[], float],
        receive: ReceiveSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        receive = receive or ReceiveSettings()
        self.bridge: BridgeSession | None = None
        self.passthrough = False
        self.adaptive = receive.receive_path == "adaptive"
        self.frames_in = 0
        self.ttfa_in_ms = 0.0
        self.frames_concealed = 0  # PLC (and holds of the adaptive buffer)
        self.frames_fec_recovered = 0
        self.frames_red_recovered = 0
        self.frames_dtx = 0  # silence the caller sent as DTX or a timestamp jump
        self.frames_lost = 0  # left as sequence gaps
        self.first_words_dropped = 0
        self._dropped_unsent = 0
        self._decoder = OpusToPcm(rate_hz)
        self._samples = frame_samples(rate_hz)
        self._silence_pcm = bytes(frame_bytes(rate_hz))
        self._concealment_max = concealment_max_frames
        self._elapsed_ms = elapsed_ms
        self._stopped = False
        self.jitter = jitter.JitterBuffer(
            clock,
            min_delay_ms=receive.jitter_min_delay_ms,
            max_delay_ms=receive.jitter_max_delay_ms,
        )
        self._waiting: deque[jitter.Slot] = deque()
        self._waiting_max = int(receive.first_words_max_s * 1000 / FRAME_MS)
        self._clock = clock
        self._next_index: int | None = None  # the pacer's frame index of the next slot
        self._deferred_at: float | None = None  # when the pending slot was deferred (tick)
        self._busy_ticks = 0  # ticks the last packet still covers (packets over 20 ms)
        self._lost_run = 0

    def outcomes(self) -> dict[str, int]:
        """The receive path's counts for the session's close log (`receive__*`)."""
        counts = {
            "receive__concealed": self.frames_concealed,
            "receive__fec_recovered": self.frames_fec_recovered,
            "receive__lost": self.frames_lost,
            "receive__dtx": self.frames_dtx,
        }
        if self.adaptive:
            jb = self.jitter
            counts |= {
                "receive__red_recovered": self.frames_red_recovered,
                "receive__late": jb.late,
                "receive__skipped": jb.skipped,
                "receive__held": jb.held,
                "receive__delay_ms": round(jb.mean_delay_ms),
                "receive__target_ms": round(jb.target_ms),
                "receive__first_words_dropped": self.first_words_dropped,
            }
        return counts

    def stop(self) -> None:
        if not self._stopped:
            _record(self)
        self._stopped = True
        self.bridge = None

    # ---- direct

    def on_opus(self, packet: bytes, rtp_timestamp: int) -> None:
        """One Opus packet from the caller (rtp.RtpReceiver: in order, late ones dropped)."""
        if self._stopped:
            return
        if not self.ttfa_in_ms:
            self.ttfa_in_ms = self._elapsed_ms()
        bridge = self.bridge
        if bridge is None:
            return  # the bridge is not listening yet
        if self.passthrough:
            bridge.send_audio(packet, OPUS_SAMPLES_PER_FRAME)
            self.frames_in += 1
            return
        samples = self._samples
        for chunk in self._decoder.push(packet):
            bridge.send_audio(chunk, samples)
            self.frames_in += 1

    def on_loss(self, packets: int) -> None:
        """`packets` caller packets that never came."""
        bridge = self.bridge
        if bridge is None:
            return
        if self.passthrough:
            bridge.skip_audio(packets, OPUS_SAMPLES_PER_FRAME)
            return
        samples = self._samples
        concealed = self._decoder.conceal(min(packets, self._concealment_max))
        for chunk in concealed:
            bridge.send_audio(chunk, samples)
            self.frames_in += 1
        self.frames_concealed += len(concealed)
        if packets > len(concealed):
            bridge.skip_audio(packets - len(concealed), samples)

    # ---- adaptive

    def on_packet(self, payload: bytes, timestamp: int, sequence: int, red: bool) -> None:
        """One caller packet as it arrived (rtp.RtpReceiver with reorder): Opus, or RED
        around Opus (RFC 2198), whose older blocks fill slots still empty."""
        if self._stopped:
            return
        if not self.ttfa_in_ms:
            self.ttfa_in_ms = self._elapsed_ms()
        if not red:
            self.jitter.push(payload, timestamp, sequence)
            return
        blocks = jitter.red_blocks(payload)
        if blocks is None:
            return
        for offset, _, data in blocks:
            back, rest = divmod(offset, jitter.FRAME_TICKS)
            if not data or rest:
                continue  # an empty block, or not a whole number of 20 ms frames back
            self.jitter.push(data, timestamp - offset, sequence - back, from_red=back > 0)

    def tick(self, frame_index: int, due: float) -> None:
        """The pacer's 20 ms clock (`due`: when this frame was due, rtp.Paced): one slot of
        the jitter buffer towards the bridge, each slot at its own due time. Slots the
        pacer skipped after a stall (rtp.plan_tick) are played here all the same, back to
        back (at most `CATCH_UP_SLOTS` x 5 of them), so that what the bridge hears keeps the
        caller's timeline and the buffer its delay. When this tick runs more than
        `LATE_TICK_S` late, a slot whose packet is not here yet waits for the next tick:
        the loop was busy, so the packet may be in the socket, unread (a timer runs before
        the loop reads its sockets); deciding then would conceal a frame that came in time."""
        now = self._clock()
        pending = self._next_index
        usual = pending == frame_index and self._deferred_at is None
        if usual and due <= now + EARLY_TICK_S:
            # The usual tick: its own slot only.
            if self._tick_slot(due, now - due > LATE_TICK_S):
                self._next_index = frame_index + 1
            else:
                self._deferred_at = now
            return
        first = frame_index if pending is None else max(pending, frame_index - CATCH_UP_SLOTS * 5)
        for index in range(first, frame_index + 1):
            at = due - (frame_index - index) * jitter.FRAME_S
            if at > now + EARLY_TICK_S:
                # Not due yet (the pacer sends a frame up to rtp.GRID_GUARD_S early): its
                # slot waits for its time, the packet may still come.
                self._next_index = index
                return
            # Deferred within one run of back-to-back ticks only: a tick after it comes once
            # the loop has read its sockets, and decides.
            deferred_at = self._deferred_at
            defer = now - at > LATE_TICK_S and (
                deferred_at is None or now - deferred_at < DEFER_RUN_S
            )
            if not self._tick_slot(at, defer):
                if deferred_at is None:
                    self._deferred_at = now
                self._next_index = index
                return
            self._deferred_at = None
        self._next_index = frame_index + 1

    def _tick_slot(self, at: float, late: bool) -> bool:
        """One slot due at `at`; False: deferred (`late` and its packet is not here)."""
        if self._stopped:
            return True
        if self._busy_ticks:
            self._busy_ticks -= 1
            return True
        slot = self.jitter.tick(at, late=late)
        if slot is None:
            return True
        if slot is jitter.DEFERRED:
            return False
        if slot.payload is not None and slot.kind == jitter.FRAME:
            self._busy_ticks = slot.duration // FRAME_TICKS - 1
        bridge = self.bridge
        waiting = self._waiting
        if bridge is None or waiting:
            if len(waiting) >= self._waiting_max:
                self.first_words_dropped += 1
                self._dropped_unsent += 1
                if not waiting:
                    return True
                waiting.popleft()
            waiting.append(slot)
            if bridge is None:
                return True
            for _ in range(min(len(waiting), CATCH_UP_SLOTS)):
                self._deliver(bridge, waiting.popleft())
            return True
        self._deliver(bridge, slot)
        return True

    def _deliver(self, bridge: BridgeSession, slot: jitter.Slot) -> None:
        if self._dropped_unsent:
            # What overflowed while the bridge was not there: a gap before what follows.
            bridge.skip_audio(self._dropped_unsent, self._frame_samples())
            self._dropped_unsent = 0
        if slot.paused:
            # Played as LOST while nothing was here, but the sender had only paused.
            concealed = min(slot.paused, self.frames_concealed)
            lost = min(slot.paused - concealed, self.frames_lost)
            self.frames_concealed -= concealed
            self.frames_lost -= lost
            self.frames_dtx += concealed + lost
        kind = slot.kind
        if slot.held and self.passthrough:
            return  # the buffer grows: this frame is a tick later, nothing is missing
        if kind == jitter.FRAME:
            self._lost_run = 0
            if slot.from_red:
                self.frames_red_recovered += 1
            self._send_packet(bridge, slot.payload or b"", slot.duration)
        elif kind == jitter.SILENCE:
            self._lost_run = 0
            self.frames_dtx += 1
            if self.passthrough:
                bridge.send_audio(
                    slot.payload or silence_packet(OPUS_CLOCK_HZ), OPUS_SAMPLES_PER_FRAME
                )
            else:
                bridge.send_audio(self._silence_pcm, self._samples)
            self.frames_in += 1
        else:
            self._lost_run += 1
            if self.passthrough:
                self.frames_lost += 1
                bridge.skip_audio(1, OPUS_SAMPLES_PER_FRAME)
                return
            pcm = self._recover(slot.fec) if self._lost_run <= self._concealment_max else None
            if pcm is None:
                self.frames_lost += 1
                pcm = self._silence_pcm
            bridge.send_audio(pcm, self._samples)
            self.frames_in += 1

    def _frame_samples(self) -> int:
        return OPUS_SAMPLES_PER_FRAME if self.passthrough else self._samples

    def _send_packet(self, bridge: BridgeSession, packet: bytes, samples: int) -> None:
        if self.passthrough:
            bridge.send_audio(packet, samples)
            self.frames_in += 1
            return
        for chunk in self._decoder.push(packet):
            bridge.send_audio(chunk, self._samples)
            self.frames_in += 1

    def _recover(self, following: bytes | None) -> bytes | None:
        """20 ms for a lost frame: the FEC in the next packet, else PLC."""
        decoder = self._decoder
        if following is not None and opus.has_fec(following):
            pcm = decoder.recover(following)
            if pcm is not None:
                self.frames_fec_recovered += 1
                return pcm
        concealed = decoder.conceal(1)
        if not concealed:
            return None
        self.frames_concealed += 1
        return concealed[0]


CATCH_UP_SLOTS = 10  # waiting slots delivered per tick once the bridge accepted
LATE_TICK_S = 0.004  # a tick this late may have packets of its slots unread in the socket
EARLY_TICK_S = 0.001  # a slot due later than this is played at the next tick
DEFER_RUN_S = 0.001  # ticks closer than this to a deferral are the same run of late ticks
FRAME_TICKS = jitter.FRAME_TICKS


class _ReceiveCounters:
    """The receive path's counts, added to the metrics once per session (at its stop)."""

    def __init__(self) -> None:
        meter = metrics.get_meter("voiceedge.transceiver")
        self.frames = TRANSCEIVER_CALLER_FRAMES.create(meter)
        self.first_words = TRANSCEIVER_FIRST_WORDS_DROPPED.create(meter)


_counters: _ReceiveCounters | None = None


def _record(audio: CallerAudio) -> None:
    global _counters
    if _counters is None:
        _counters = _ReceiveCounters()
    for outcome, count in (
        ("concealed", audio.frames_concealed),
        ("fec_recovered", audio.frames_fec_recovered),
        ("red_recovered", audio.frames_red_recovered),
        ("dtx", audio.frames_dtx),
        ("lost", audio.frames_lost),
        ("late", audio.jitter.late),
    ):
        if count:
            _counters.frames.add(count, {"frame.outcome": outcome})
    if audio.first_words_dropped:
        _counters.first_words.add(audio.first_words_dropped)
