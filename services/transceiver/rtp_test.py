"""rtp.py: header parse, the mid extension, the receiver's order/loss/jitter bookkeeping over
real SRTP sessions (pylibsrtp), the sender's headers, and the shared pacer on a real loop."""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import time
import weakref

import pylibsrtp
import pytest

from services.transceiver import rtp, rtpcore
from services.transceiver.sdp import AudioRtpParams

KEY = os.urandom(30)  # SRTP_AES128_CM_SHA1_80 master key + salt


def srtp_pair() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=KEY, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    rx = pylibsrtp.Session(pylibsrtp.Policy(key=KEY, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    return tx, rx


def packet(seq: int, ts: int, payload: bytes = b"opus", pt: int = 111, ssrc: int = 7) -> bytes:
    return rtp.HEADER.pack(0x80, pt, seq, ts, ssrc) + payload


def test_parse_skips_csrcs_extension_and_padding() -> None:
    extension = rtp.mid_extension(3, "0")
    header = rtp.HEADER.pack(0x80 | 0x20 | 0x10 | 2, 0x80 | 111, 65535, 4294967295, 9)
    data = header + bytes(8) + extension + b"PAYLOAD" + b"\x00\x00\x03"
    assert rtp.parse(data) == (111, 65535, 4294967295, 9, b"PAYLOAD")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x6f\x00", "shorter than the 12-byte header"),
        (rtp.HEADER.pack(0x40, 111, 1, 1, 1), "version 1"),
        (rtp.HEADER.pack(0x90, 111, 1, 1, 1) + b"\xbe", "extension cut short"),
        (rtp.HEADER.pack(0xA0, 111, 1, 1, 1) + b"\x01\x09", "longer than the packet"),
        (rtp.HEADER.pack(0x8F, 111, 1, 1, 1), "longer than the packet"),
    ],
)
def test_parse_rejects_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(rtp.RtpError, match=message):
        rtp.parse(data)


def test_mid_extension_is_rfc8285_one_byte_form() -> None:
    block = rtp.mid_extension(4, "audio")
    assert struct.unpack_from("!HH", block) == (0xBEDE, 2)
    assert block[4] == (4 << 4) | (5 - 1)
    assert block[5:10] == b"audio"
    assert block[10:] == b"\x00\x00"
    with pytest.raises(ValueError, match="do not fit"):
        rtp.mid_extension(15, "0")
    with pytest.raises(ValueError, match="do not fit"):
        rtp.mid_extension(1, "x" * 17)


class FakeClock:
    """Arrival times for jitter arithmetic (not for synchronisation)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# Every receiver and sender test runs on both cores: rtpcore's C one (native) and the Python
# reference it must match.
BOTH_CORES = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def test_the_native_core_is_built_and_used() -> None:
    # Without this, a missing or unusable extension would leave every test below passing
    # twice on the Python core.
    tx, rx = srtp_pair()
    assert rtpcore.load() is not None
    params = AudioRtpParams(payload_type=111, ssrc=1, mid="", mid_extension_id=0)
    assert rtp.RtpReceiver(rx, 111, lambda p, ts: None).native
    assert rtp.RtpSender(params, tx, lambda d: None).native
    assert not rtp.RtpReceiver(rx, 111, lambda p, ts: None, native=False).native


@BOTH_CORES
def test_receiver_orders_counts_loss_and_drops_what_it_cannot_use(native: bool) -> None:
    tx, rx = srtp_pair()
    got: list[tuple[bytes, int]] = []
    losses: list[int] = []
    clock = FakeClock()
    receiver = rtp.RtpReceiver(
        rx, 111, lambda p, ts: got.append((p, ts)), clock, on_loss=losses.append, native=native
    )

    def deliver(seq: int, pt: int = 111) -> bytes:
        clock.now = 100.0 + seq * 0.02
        datagram = tx.protect(packet(seq, seq * 960, pt=pt))
        receiver.datagram(datagram)
        return datagram

    for seq in (65533, 65534, 65535, 0):  # across the 16-bit wrap
        deliver(seq)
    receiver.datagram(deliver(1))  # a duplicate: SRTP's replay check drops it, counted
    deliver(3)  # 2 lost
    receiver.datagram(tx.protect(packet(2, 2 * 960)))  # late: older than 3
    deliver(4, pt=0)  # a PCMU packet: not the negotiated Opus payload type
    receiver.datagram(b"\x80" + os.urandom(40))  # garbage that fails authentication
    assert [ts for _, ts in got] == [s * 960 % (1 << 32) for s in (65533, 65534, 65535, 0, 1, 3)]
    stats = receiver.stats
    assert stats.packets == 6
    assert receiver.lost == 1
    assert stats.dropped_late == 1
    assert stats.dropped_payload_type == 1
    assert stats.dropped_srtp == 2  # the SRTP replay and the garbage
    assert stats.jitter_ticks == 0.0  # perfectly paced arrivals
    assert losses == [1]  # told before packet 3 that 1 packet (2) is missing


@BOTH_CORES
def test_reordering_receiver_passes_older_packets_with_their_sequence(native: bool) -> None:
    """The adaptive path: packets behind the newest go on (the jitter buffer orders them),
    extended sequence numbers across the wrap, RED packets flagged, no on_loss."""
    tx, rx = srtp_pair()
    got: list[tuple[int, int, bool]] = []
    losses: list[int] = []
    receiver = rtp.RtpReceiver(
        rx,
        111,
        lambda p, ts, seq, red: got.append((ts, seq, red)),
        on_loss=losses.append,
        native=native,
        reorder=True,
        red_payload_type=63,
    )
    for seq, pt in ((65534, 111), (0, 111), (65535, 111), (2, 63), (1, 111), (3, 0)):
        datagram = tx.protect(packet(seq, seq * 960, pt=pt))
        receiver.datagram(datagram)
    receiver.datagram(datagram)  # a duplicate: SRTP's replay check
    assert got == [
        (65534 * 960, 65534, False),
        (0, 65536, False),
        (65535 * 960, 65535, False),  # older than the newest: passed, not dropped
        (2 * 960, 65538, True),  # RED
        (960, 65537, False),
    ]
    assert losses == []
    stats = receiver.stats
    assert stats.packets == 5
    assert receiver.lost == 0
    assert stats.dropped_srtp == 1
    assert stats.dropped_payload_type == 1


@BOTH_CORES
@pytest.mark.parametrize(
    "clear",
    [
        b"\xa0\x6f\x00\x05" + bytes(8) + b"opus\xc8",  # padding count 200: past the header
        b"\x40\x6f\x00\x05" + bytes(8) + b"opus",  # RTP version 1
    ],
    ids=["padding", "version"],
)
def test_receiver_counts_malformed_clear_packets(native: bool, clear: bytes) -> None:
    # Headers libsrtp protects but RTP parsing refuses (libsrtp itself refuses CSRC lists
    # and extensions that overrun the packet).
    tx, rx = srtp_pair()
    got: list[tuple[bytes, int]] = []
    receiver = rtp.RtpReceiver(rx, 111, lambda p, ts: got.append((p, ts)), native=native)
    receiver.datagram(tx.protect(packet(1, 960)))
    receiver.datagram(tx.protect(clear))
    receiver.datagram(tx.protect(packet(6, 1920)))
    assert [ts for _, ts in got] == [960, 1920]
    assert receiver.stats.dropped_malformed == 1
    assert receiver.lost == 4  # 2-5 never came as usable packets


@BOTH_CORES
def test_receiver_jitter_follows_rfc3550(native: bool) -> None:
    tx, rx = srtp_pair()
    clock = FakeClock()
    receiver = rtp.RtpReceiver(rx, 111, lambda p, ts: None, clock, native=native)
    for seq in range(200):
        clock.now = 100.0 + seq * 0.02 + (0.005 if seq % 2 else 0.0)  # +-5 ms alternating
        receiver.datagram(tx.protect(packet(seq, seq * 960)))
    # |D| is 5 ms every packet, so J converges to 5 ms (RFC 3550 A.8).
    assert receiver.stats.jitter_ms == pytest.approx(5.0, rel=0.01)


@BOTH_CORES
def test_sender_writes_headers_the_receiver_reads(native: bool) -> None:
    tx, rx = srtp_pair()
    sent: list[bytes] = []
    reports: list[tuple[int, int, int]] = []
    params = AudioRtpParams(payload_type=111, ssrc=1234, mid="0", mid_extension_id=9)
    sender = rtp.RtpSender(
        params, tx, sent.append, lambda ts, n, o: reports.append((ts, n, o)), native=native
    )
    first_sequence = sender.sequence
    for index in (0, 1, 3):  # frame 2 skipped: the timestamp shows the gap
        sender.send(b"P" * 10, index, 960)
    clear = [rx.unprotect(d) for d in sent]
    parsed = [rtp.parse(c) for c in clear]
    assert [p[1] for p in parsed] == [(first_sequence + i) % 65536 for i in range(3)]
    base = parsed[0][2]
    assert [(p[2] - base) % (1 << 32) for p in parsed] == [0, 960, 2880]
    assert all(p[0] == 111 and p[3] == 1234 and p[4] == b"P" * 10 for p in parsed)
    assert [c[1] >> 7 for c in clear] == [1, 0, 0]  # marker on the first packet only
    assert all(rtp.mid_extension(9, "0") in c for c in clear)
    # Sender-report samples: the 1st packet, then every 5th (RTP time with its counts).
    assert reports == [(parsed[0][2], 1, 10)]
    for index in range(4, 8):
        sender.send(b"P" * 10, index, 960)
    assert [r[1:] for r in reports] == [(1, 10), (6, 60)]


class Recorder:
    def __init__(self) -> None:
        self.frames: list[int] = []
        self.dues: list[tuple[float, float]] = []  # (due, loop time of the call)
        self.enough = asyncio.Event()
        self.want = 0

    def tick(self, frame_index: int, due: float) -> None:
        self.frames.append(frame_index)
        self.dues.append((due, asyncio.get_running_loop().time()))
        if len(self.frames) >= self.want:
            self.enough.set()


@pytest.mark.timeout_s(10)
async def test_pacer_keeps_each_stream_contiguous_through_a_stall() -> None:
    pacer = rtp.Pacer()
    a, b = Recorder(), Recorder()
    a.want = 5
    pacer.add(a)
    await a.enough.wait()
    pacer.add(b)
    b.want = 3
    await b.enough.wait()
    # A 100 ms stall of the loop (on purpose): the next tick sends every frame that came due.
    time.sleep(0.1)  # noqa: ASYNC251 (the stall under test)
    a.want = len(a.frames) + 6
    a.enough.clear()
    await a.enough.wait()
    assert a.frames == list(range(len(a.frames)))
    assert b.frames == list(range(len(b.frames)))
    for stream in (a, b):
        # Each frame's due time is on the grid, 20 ms after the one before; no frame goes
        # out before it (within the grid's guard), a stall's frames after it.
        first = stream.dues[0][0]
        for index, (due, called) in enumerate(stream.dues):
            assert due == pytest.approx(first + index * rtp.FRAME_S, abs=1e-9)
            assert called >= due - rtp.GRID_GUARD_S - 1e-6
    assert pacer.late_ticks >= 1
    assert pacer.skipped_frames == 0
    # A stall longer than MAX_CATCH_UP_FRAMES skips ahead instead of bursting.
    time.sleep(0.3)  # noqa: ASYNC251 (the stall under test)
    before = len(a.frames)
    a.want = before + 2
    a.enough.clear()
    await a.enough.wait()
    assert pacer.skipped_frames > 0
    assert a.frames[before] > a.frames[before - 1] + 1
    pacer.remove(a)
    pacer.remove(b)
    assert len(pacer) == 0
    pacer.close()


class Broken:
    def tick(self, frame_index: int, due: float) -> None:
        raise RuntimeError("a bug in one session")


@pytest.mark.timeout_s(10)
async def test_one_failing_stream_does_not_stop_the_others() -> None:
    around: list[str] = []
    pacer = rtp.Pacer(
        before_tick=lambda: around.append("hold"), after_tick=lambda: around.append("flush")
    )
    good = Recorder()
    good.want = 3
    pacer.add(Broken())
    pacer.add(good)
    await good.enough.wait()
    assert pacer.failed_streams == 1
    assert len(pacer) == 1
    assert around[:4] == ["hold", "flush", "hold", "flush"]
    pacer.close()


@BOTH_CORES
def test_receiver_report_follows_rfc3550_6_4_2(native: bool) -> None:
    tx, rx = srtp_pair()
    clock = FakeClock()
    receiver = rtp.RtpReceiver(rx, 111, lambda p, ts: None, clock, native=native)
    assert receiver.receiver_report(1, 0, 0) is None  # nothing received yet
    for i, seq in enumerate([*range(65530, 65536), *range(0, 4)]):  # 10 across the wrap...
        clock.now = 100.0 + i * 0.02  # paced: jitter stays 0
        if seq != 65534:  # ...1 lost
            receiver.datagram(tx.protect(packet(seq, i * 960, ssrc=4242)))
    report = receiver.receiver_report(99, 0x12345678, 65536)
    assert report is not None
    fields = rtp.RECEIVER_REPORT.unpack(report)
    first, pt, length, reporter, source, loss, highest, jitter, lsr, dlsr = fields
    assert (first >> 6, first & 0x1F, pt, length) == (2, 1, 201, 7)
    assert (reporter, source) == (99, 4242)
    assert loss >> 24 == 25  # 1 of 10 lost: floor(256 / 10)
    assert loss & 0xFFFFFF == 1
    assert highest == 65536 + 3  # one wrap counted in the extended sequence
    assert jitter == 0
    assert (lsr, dlsr) == (0x12345678, 65536)
    for i, seq in enumerate(range(4, 8), start=10):
        clock.now = 100.0 + i * 0.02
        receiver.datagram(tx.protect(packet(seq, i * 960, ssrc=4242)))
    again = rtp.RECEIVER_REPORT.unpack(receiver.receiver_report(99, 0, 0) or b"")
    assert again[5] >> 24 == 0  # nothing lost since the last report
    assert again[5] & 0xFFFFFF == 1  # cumulative


@BOTH_CORES
def test_a_session_holding_its_receiver_and_sender_is_collected(native: bool) -> None:
    # The receiver's sink and the sender's send are the owning session's bound methods: a
    # cycle through the C objects, which the collector must see (tp_traverse) to free it.
    tx, rx = srtp_pair()
    params = AudioRtpParams(payload_type=111, ssrc=1, mid="", mid_extension_id=0)

    class Owner:
        def __init__(self) -> None:
            self.receiver = rtp.RtpReceiver(rx, 111, self.on_payload, native=native)
            self.sender = rtp.RtpSender(params, tx, self.on_datagram, native=native)

        def on_payload(self, payload: bytes, timestamp: int) -> None:
            pass

        def on_datagram(self, datagram: bytes) -> None:
            pass

    owner = Owner()
    owner.sender.send(b"opus", 0, 960)
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None
