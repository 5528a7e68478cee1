"""Audio between aiortc and the bridge: caller frames -> fixed 20 ms PCM chunks, and bridge
PCM -> a paced outbound track with a small jitter buffer that barge-in clears at once."""

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

from services.transceiver import opus
from services.transceiver.bridge import BridgeSession

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


class Playout:
    """Outbound audio, one Opus packet per 20 ms tick (`next_packet`). Bridge audio queues
    here (bounded, the oldest frames drop first); playout starts once `prebuffer` frames are
    queued or the first one has waited that long, and a silence packet fills gaps.
    `clear()` drops everything queued (barge-in)."""

    def __init__(
        self,
        rate_hz: int,
        *,
        prebuffer: int,
        max_frames: int,
        on_first_audio: Callable[[], None] | None = None,
        encoder: EncoderOptions | None = None,
    ) -> None:
        self.passthrough = False
        self._encoder_options = (
            encoder or EncoderOptions()
        )  # True: the queue holds Opus packets from the bridge
        self.rate_hz = rate_hz
        self._chunks = Rechunker(frame_bytes(rate_hz))
        self._queue: deque[bytes] = deque(maxlen=max_frames)
        self._prebuffer = prebuffer
        self._first_queued_at: float | None = None
        self._playing = False
        self._encoder = OpusPacketizer(rate_hz, self._encoder_options)
        self._silence = silence_packet(rate_hz)
        self._on_first_audio = on_first_audio
        self.frames_played = 0
        self.frames_dropped = 0
        self.clears = 0

    def set_rate(self, rate_hz: int) -> None:
        """The bridge's output rate, known once it accepted; before any audio is queued."""
        if rate_hz == self.rate_hz:
            return
        self.clear()
        self.clears -= 1
        self.rate_hz = rate_hz
        self._chunks = Rechunker(frame_bytes(rate_hz))
        self._encoder = OpusPacketizer(rate_hz, self._encoder_options)
        self._silence = silence_packet(rate_hz)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def push(self, pcm: bytes) -> None:
        """Queues bridge audio: PCM at rate_hz (any length), or one Opus packet in
        passthrough mode."""
        for chunk in [pcm] if self.passthrough else self._chunks.push(pcm):
            if len(self._queue) == self._queue.maxlen:
                self.frames_dropped += 1
            self._queue.append(chunk)
        if self._queue and self._first_queued_at is None:
            self._first_queued_at = time.monotonic()

    def clear(self) -> int:
        dropped = len(self._queue)
        self._queue.clear()
        self._chunks.clear()
        self._first_queued_at = None
        self._playing = False
        self.clears += 1
        return dropped

    def next_packet(self) -> bytes:
        if not self._playing and self._queue:
            waited = time.monotonic() - (self._first_queued_at or 0.0)
            if len(self._queue) >= self._prebuffer or waited >= self._prebuffer * FRAME_MS / 1000:
                self._playing = True
                if not self.passthrough:
                    self._encoder.after_silence()  # the caller heard silence packets until now
        if self._playing and self._queue:
            payload = self._queue.popleft()
            if not self._queue:
                self._first_queued_at = None
            if self.frames_played == 0 and self._on_first_audio is not None:
                self._on_first_audio()
            self.frames_played += 1
            if self.passthrough:
                return payload
            return self._encoder.encode(payload) or self._silence
        self._playing = False
        return self._silence


class CallerAudio:
    """Caller Opus packets -> the bridge: decoded to 20 ms PCM at the session's rate, or
    passed through; lost packets (a sequence gap) become libopus packet loss concealment
    for up to `concealment_max_frames` of them, the rest (and every lost frame in
    passthrough) a gap in AudioFrame.sequence, as inference.proto says. Nothing goes out
    until `bridge` is set (the bridge accepted) or after `stop()`."""

    def __init__(
        self, rate_hz: int, concealment_max_frames: int, elapsed_ms: Callable[[], float]
    ) -> None:
        self.bridge: BridgeSession | None = None
        self.passthrough = False
        self.frames_in = 0
        self.frames_concealed = 0  # lost frames filled by libopus PLC (the call record)
        self.frames_fec_recovered = 0  # lost frames rebuilt from in-band FEC (none yet)
        self.ttfa_in_ms = 0.0
        self._decoder = OpusToPcm(rate_hz)
        self._samples = frame_samples(rate_hz)
        self._concealment_max = concealment_max_frames
        self._elapsed_ms = elapsed_ms
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        self.bridge = None

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
        self.frames_concealed += len(concealed)
        for chunk in concealed:
            bridge.send_audio(chunk, samples)
            self.frames_in += 1
        if packets > len(concealed):
            bridge.skip_audio(packets - len(concealed), samples)
