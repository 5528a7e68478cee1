"""opus.py against the system libopus: a tone survives encode -> decode at the bridge's
rate, and bad input is refused, never read past."""

from __future__ import annotations

import numpy as np
import pytest

from services.transceiver import opus
from services.transceiver.media import OpusPacketizer, OpusToPcm, Playout
from services.transceiver.transceiver_testing import peak_frequency


def tone(rate: int, seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


@pytest.mark.parametrize("application", sorted(opus.APPLICATIONS))
@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_tone_round_trips_at_the_bridge_rate(rate: int, application: str) -> None:
    encoder = opus.Encoder(rate, application, 48000, 5)
    decoder = opus.Decoder(rate)
    frame = rate // 50
    pcm = tone(rate, 1.0)
    out = b"".join(
        decoder.decode(encoder.encode(pcm[i : i + frame * 2], frame))
        for i in range(0, len(pcm), frame * 2)
    )
    assert len(out) == len(pcm)  # 20 ms in, 20 ms out, at `rate`
    samples = np.frombuffer(out, dtype="<i2")[rate // 5 :]  # past the codec's delay
    assert peak_frequency(samples, rate) == pytest.approx(440.0, rel=0.02)


def test_media_wrappers_decode_to_20ms_chunks_and_skip_corrupt_packets() -> None:
    packetizer = OpusPacketizer(24000)
    to_pcm = OpusToPcm(24000)
    packet = packetizer.encode(tone(24000, 0.02))
    assert packet is not None
    assert [len(c) for c in to_pcm.push(packet)] == [960]
    assert to_pcm.push(b"\xff" * 3) == []  # corrupt: skipped like a lost packet
    assert packetizer.encode(b"\x00" * 10) is None  # wrong length: refused, not over-read


def test_lost_packets_become_concealment_of_the_same_length() -> None:
    packetizer = OpusPacketizer(24000)
    to_pcm = OpusToPcm(24000)
    for _ in range(10):
        packet = packetizer.encode(tone(24000, 0.02))
        assert packet is not None
        to_pcm.push(packet)
    concealed = to_pcm.conceal(3)
    assert [len(c) for c in concealed] == [960, 960, 960]
    assert any(concealed[0])  # PLC continues the tone rather than silence


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="rate 44100"):
        opus.Decoder(44100)
    with pytest.raises(ValueError, match="application 'music'"):
        opus.Encoder(24000, "music", 48000, 5)
    with pytest.raises(opus.OpusError, match="opus_encoder_ctl"):
        opus.Encoder(24000, "audio", 48000, 99)
    encoder = opus.Encoder(24000, "audio", 48000, 5)
    with pytest.raises(ValueError, match="10 bytes for 480 samples"):
        encoder.encode(b"\x00" * 10, 480)
    with pytest.raises(opus.OpusError, match="opus_decode"):
        opus.Decoder(24000).decode(b"\xff" * 3)


def _level_dbfs(packet: bytes, decoder: opus.Decoder) -> float:
    pcm = np.frombuffer(decoder.decode(packet), dtype=np.int16).astype(np.float64)
    return float(20 * np.log10(max(np.sqrt(np.mean(pcm**2)), 1e-9) / 32768))


def test_every_answer_starts_at_full_level_after_the_silence_packets() -> None:
    """The caller's decoder hears our ready-made silence packets between answers; the
    playout's encoder is brought to the same state first, or its first packets decode
    25-40 dB too quiet (Opus codes band energies relative to the previous frame)."""
    playout = Playout(24000, prebuffer=0, max_frames=100)
    caller = opus.Decoder(48000)
    answer = tone(24000, 0.2)
    for _ in range(2):  # the first answer, then one after a gap
        for _ in range(25):
            _level_dbfs(playout.next_packet(), caller)  # silence between answers
        playout.push(answer)
        levels = [_level_dbfs(playout.next_packet(), caller) for _ in range(10)]
        assert min(levels[:3]) > -20.0, levels  # the tone is -13.5 dBFS
