"""Playout as a caller hears it: a real transceiver (real gRPC, one real UDP port), a test
bridge on port 0 that pushes audio as it likes, and an aiortc caller that logs every RTP
packet as it arrives (before aiortc's jitter buffer)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from services.transceiver import aiortc_compat
from services.transceiver.media import silence_packet
from services.transceiver.session import Session
from services.transceiver.transceiver_testing import (
    BridgeStream,
    Client,
    Stack,
    closed_reason,
    wait_for,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

Resp = inference_pb2.StreamSessionResponse
RATE = 24000
FRAME_BYTES = RATE // 50 * 2
SILENCE = silence_packet(RATE)


@dataclass(frozen=True)
class Packet:
    sequence: int
    timestamp: int
    audio: bool  # response audio, not the transceiver's silence fill
    at: float  # loop time of arrival


@dataclass
class RtpLog:
    """Every RTP packet the caller received, in arrival order."""

    packets: list[Packet] = field(default_factory=list)

    def add(self, sequence: int, timestamp: int, payload: bytes, at: float) -> None:
        self.packets.append(Packet(sequence, timestamp, payload != SILENCE, at))

    def audio(self) -> list[Packet]:
        return [p for p in self.packets if p.audio]

    def quiet_for(self, packets: int) -> bool:
        """The last `packets` packets were all silence fill."""
        tail = self.packets[-packets:]
        return len(tail) == packets and not any(p.audio for p in tail)


def caller() -> tuple[Client, RtpLog]:
    client = Client(tone_hz=440.0, decode_audio=False, pre_encoded=True)
    log = RtpLog()
    (audio,) = client.pc.getTransceivers()
    aiortc_compat.tap_rtp_packets(audio.receiver, log.add)
    return client, log


async def open_call(stack: Stack, client: Client, session_id: str) -> tuple[BridgeStream, Session]:
    await stack.connect(session_id, client)
    async with asyncio.timeout(10):
        await client.connected.wait()
    await wait_for(lambda: session_id in stack.bridge.streams)
    session = stack.manager.find(session_id)
    assert isinstance(session, Session)
    return stack.bridge.streams[session_id], session


def tone_frames(seconds: float, first_sequence: int = 0) -> list[Resp]:
    """A 660 Hz answer, 24 kHz PCM in 20 ms frames numbered from `first_sequence`."""
    t = np.arange(int(RATE * seconds)) / RATE
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 660.0 * t)).astype(np.int16).tobytes()
    return [
        Resp(
            audio_frame=inference_pb2.AudioFrame(
                data=pcm[offset : offset + FRAME_BYTES], sequence=first_sequence + index
            )
        )
        for index, offset in enumerate(range(0, len(pcm), FRAME_BYTES))
    ]


def inject(stream: BridgeStream, *messages: Resp) -> None:
    for message in messages:
        stream.inject.put_nowait(message)


def started(response_id: str) -> Resp:
    return Resp(response_started=inference_pb2.ResponseStarted(response_id=response_id))


@pytest.mark.timeout_s(120)
async def test_a_burst_of_8_s_reaches_the_caller_over_8_s_one_packet_per_20_ms() -> None:
    stack = await Stack.start()
    stack.bridge.echo = False
    client, log = caller()
    try:
        stream, session = await open_call(stack, client, "burst")
        frames = tone_frames(8.0)
        assert len(frames) == 400
        # The bridge pushes the 8 s within 0.5 s: 20 bursts of 20 frames, 25 ms apart.
        pushed_from = asyncio.get_running_loop().time()
        for burst in range(0, 400, 20):
            inject(stream, *frames[burst : burst + 20])
            await asyncio.sleep(0.025)  # the bridge's own send rate, not a synchronisation
        pushed_in = asyncio.get_running_loop().time() - pushed_from
        await wait_for(lambda: len(log.audio()) >= 400 and log.quiet_for(5), timeout_s=30)

        audio = log.audio()
        assert len(audio) == 400  # nothing dropped
        assert session.playout.frames_dropped == 0
        span = audio[-1].at - audio[0].at  # 399 intervals of 20 ms: 7.98 s
        # From its first packet to its last, every packet in between (fill included, of
        # which there is none) is the next sequence number and 960 ticks later.
        first = log.packets.index(audio[0])
        run = log.packets[first : first + 400]
        assert all(p.audio for p in run)
        steps = {(b.sequence - a.sequence) % 65536 for a, b in itertools.pairwise(run)}
        ticks = {(b.timestamp - a.timestamp) % 2**32 for a, b in itertools.pairwise(run)}
        print(f"playout: 400 frames pushed in {pushed_in:.3f} s, played over {span:.3f} s")
        assert steps == {1}
        assert ticks == {960}
        assert 7.9 <= span <= 8.1
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(120)
async def test_clear_reports_what_the_caller_heard_and_the_cancelled_response_never_plays() -> None:
    stack = await Stack.start()
    stack.bridge.echo = False
    stack.bridge.echo_events = False
    client, log = caller()
    try:
        stream, session = await open_call(stack, client, "clear")
        inject(stream, started("resp_1"), *tone_frames(5.0))
        await wait_for(lambda: len(log.audio()) >= 50, timeout_s=20)

        # Barge-in, with 1 s more of resp_1 that the bridge still had in flight.
        clear_at = asyncio.get_running_loop().time()
        inject(stream, Resp(clear=inference_pb2.ClearAudio()), *tone_frames(1.0, 250))
        async with asyncio.timeout(10):
            report = await stream.reports.get()
        await wait_for(lambda: log.quiet_for(10), timeout_s=10)
        heard = log.audio()
        late_ms = (heard[-1].at - clear_at) * 1000
        print(f"clear: last old packet {late_ms:.1f} ms after the bridge sent ClearAudio")
        assert report.response_id == "resp_1"
        assert abs(report.played_ms - 20 * len(heard)) <= 20
        assert abs(report.next_sequence - len(heard)) <= 1
        assert report.dropped_ms >= 4000 - report.played_ms - 20
        assert late_ms < 100  # one frame, plus the gRPC hop on a loaded machine

        # The next response plays, and nothing of resp_1 ever does.
        inject(stream, started("resp_2"), *tone_frames(1.0, 300))
        await wait_for(lambda: len(log.audio()) >= len(heard) + 50 and log.quiet_for(10), 20)
        assert len(log.audio()) == len(heard) + 50
        assert session.playout.frames_discarded == 50
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(120)
async def test_bridge_hang_up_after_playout_lets_the_caller_hear_the_last_sentence() -> None:
    stack = await Stack.start()
    stack.bridge.echo = False
    callers = [caller(), caller()]
    try:
        for name, (client, _log) in zip(("bye", "cut"), callers, strict=True):
            stream, _ = await open_call(stack, client, name)
            # 2 s and 10 ms of goodbye at once, then the end: after playout, or at once.
            goodbye = tone_frames(2.01)
            assert len(goodbye) == 101
            end = inference_pb2.SessionEnd(
                reason=common_pb2.CLOSE_REASON_BRIDGE_ENDED, after_playout=name == "bye"
            )
            inject(stream, started(name), *goodbye, Resp(session_end=end))
        for client, _ in callers:
            async with asyncio.timeout(20):
                await client.ended.wait()
        assert await closed_reason(stack, "bye") == common_pb2.CLOSE_REASON_BRIDGE_ENDED
        assert await closed_reason(stack, "cut") == common_pb2.CLOSE_REASON_BRIDGE_ENDED
        (_, bye), (_, cut) = callers
        assert len(bye.audio()) == 101  # every frame, the padded 10 ms last
        assert len(cut.audio()) < 50  # the contrast: ended at once, the sentence cut
    finally:
        for client, _ in callers:
            await client.close()
        await stack.stop()
