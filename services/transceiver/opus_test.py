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


def speechlike(rate: int, seconds: float) -> bytes:
    """A voiced sound libopus codes with SILK: a 150 Hz pulse train's harmonics, wobbling."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = 150.0 + 20.0 * np.sin(2 * np.pi * 3.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = np.zeros_like(phase)
    for k in range(1, 12):
        wave += np.sin(k * phase) / k
    return (0.15 * 32767 * wave / 3).astype("<i2").tobytes()


def test_in_band_fec_recovers_a_lost_frame_better_than_plc() -> None:
    rate, frame = 24000, 480
    encoder = opus.Encoder(rate, "voip", 32000, 5, inband_fec=True, packet_loss_percent=20)
    plain = opus.Encoder(rate, "voip", 32000, 5)
    pcm = speechlike(rate, 2.0)
    chunks = [pcm[i : i + frame * 2] for i in range(0, len(pcm), frame * 2)]
    packets = [encoder.encode(chunk, frame) for chunk in chunks]
    assert sum(opus.has_fec(p) for p in packets[10:]) > 0.2 * len(packets[10:])
    assert not any(opus.has_fec(plain.encode(chunk, frame)) for chunk in chunks[10:30])
    lost = next(i for i in range(20, len(packets) - 1) if opus.has_fec(packets[i + 1]))
    with_fec, with_plc, reference = opus.Decoder(rate), opus.Decoder(rate), opus.Decoder(rate)
    for packet in packets[:lost]:
        for decoder in (with_fec, with_plc, reference):
            decoder.decode(packet)
    truth = np.frombuffer(reference.decode(packets[lost]), dtype="<i2").astype(float)
    fec = np.frombuffer(with_fec.decode_fec(packets[lost + 1], frame), dtype="<i2")
    plc = np.frombuffer(with_plc.conceal(frame), dtype="<i2")
    assert len(fec) == len(plc) == frame
    error_fec = np.mean((fec - truth) ** 2)
    error_plc = np.mean((plc - truth) ** 2)
    assert error_fec < 0.5 * error_plc
    # Without LBRR in the next packet, decode_fec is the PLC: has_fec says which it is.
    for index in range(20, 40):
        a, b = opus.Decoder(rate), opus.Decoder(rate)
        for packet in packets[:index]:
            a.decode(packet)
            b.decode(packet)
        recovered = a.decode_fec(packets[index + 1], frame) != b.conceal(frame)
        assert recovered == opus.has_fec(packets[index + 1])


@pytest.mark.parametrize(
    ("packet", "fec"),
    [
        (b"", False),
        (bytes([0x08]), False),  # TOC only
        (bytes([0x08, 0x40]), True),  # SILK WB 20 ms mono: VAD bit, then LBRR
        (bytes([0x08, 0x80]), False),  # VAD set, LBRR clear
        (bytes([0x10, 0x20]), True),  # SILK 40 ms: two VAD bits, then LBRR
        (bytes([0x0C, 0x10]), True),  # stereo 20 ms: the side channel's LBRR
        (bytes([0xF8, 0xFF]), False),  # CELT: no LBRR
        (bytes([0x0A, 0x40]), False),  # code 2: not read
    ],
)
def test_has_fec_reads_the_lbrr_flag(packet: bytes, fec: bool) -> None:
    assert opus.has_fec(packet) is fec


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
