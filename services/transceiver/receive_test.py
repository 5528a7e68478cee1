"""The adaptive receive path end to end: an aiortc caller through the in-test framing relay
(which reorders and drops its RTP), the transceiver on its real UDP port, the echo bridge
over real gRPC, all on 127.0.0.1."""

from __future__ import annotations

import itertools

import pytest

from services.transceiver.session import Session
from services.transceiver.transceiver_testing import (
    BridgeStream,
    Client,
    OpusToneTrack,
    Stack,
    wait_for,
)


async def _stream(stack: Stack, session_id: str, timeout_s: float = 15.0) -> BridgeStream:
    await wait_for(lambda: stack.bridge.streams.get(session_id) is not None, timeout_s)
    return stack.bridge.streams[session_id]


def _session(stack: Stack, session_id: str) -> Session:
    session = stack.manager.find(session_id)
    assert isinstance(session, Session)
    return session


def _gaps(stream: BridgeStream) -> int:
    sequences = [sequence for sequence, _ in stream.arrivals]
    return sum(b - a - 1 for a, b in itertools.pairwise(sequences) if b > a + 1)


@pytest.mark.parametrize("passthrough", [False, True], ids=["pcm", "passthrough"])
@pytest.mark.timeout_s(60)
async def test_first_words_wait_for_a_slow_bridge_and_arrive_contiguous(passthrough: bool) -> None:
    """The bridge accepts 1.5 s after SessionStart; it still gets every frame from the
    caller's first packet on, in order, with no gap."""
    stack = await Stack.start(receive_path="adaptive")
    stack.bridge.record_arrivals = True
    stack.bridge.accept_delay_s = 1.5
    tone = OpusToneTrack(440.0, frames=150)  # 3 s: half of it before the bridge accepts
    client = Client(tone=tone)
    try:
        await stack.connect("fw", client, opus_passthrough=passthrough)
        stream = await _stream(stack, "fw")
        try:
            await wait_for(lambda: stream.audio_in >= 150, 20.0)
        except TimeoutError:
            audio = _session(stack, "fw")._caller_audio
            raise AssertionError(
                (
                    stream.audio_in,
                    audio.frames_in,
                    audio.frames_lost,
                    audio.frames_dtx,
                    len(audio._waiting),
                    audio.jitter.late,
                    audio.jitter.buffered,
                    _session(stack, "fw")._rtp.receiver.stats,  # type: ignore[union-attr]
                    [f.sequence for f in stream.frames[:5]],
                    [
                        tone.packets.index(f.data) if f.data in tone.packets else -1
                        for f in stream.frames[:8]
                    ],
                    [f.sequence for f in stream.frames][-5:],
                )
            ) from None
        sequences = [frame.sequence for frame in stream.frames[:150]]
        assert sequences == list(range(150))
        audio = _session(stack, "fw")._caller_audio
        assert audio.first_words_dropped == 0
        if passthrough:
            # Frame k is the caller's k-th packet: nothing before the bridge accepted lost.
            assert [f.data for f in stream.frames[:150]] == [
                tone.packets[k % len(tone.packets)] for k in range(150)
            ]
        else:
            assert audio.frames_lost == 0
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_reordered_and_lost_packets_reach_the_bridge_in_order_one_per_20ms() -> None:
    """10 % of the caller's packets swapped with the next one and 5 % lost, with libopus
    in-band FEC on: the bridge gets one PCM frame per 20 ms of caller audio, in order and
    with no gap; reordered packets are played in place, lost ones mostly come back from
    the next packet's FEC."""
    stack = await Stack.start(receive_path="adaptive")
    stack.bridge.record_arrivals = True
    frames = 250
    client = Client(tone=OpusToneTrack(440.0, frames=frames, fec=True))
    stack.relay.swap_rtp_every = 10
    stack.relay.drop_rtp_every = 20
    try:
        await stack.connect("ro", client)
        stream = await _stream(stack, "ro")
        session = _session(stack, "ro")
        audio = session._caller_audio
        # The last caller packet played, then the underrun after the caller stopped.
        await wait_for(lambda: stream.audio_in >= frames + 3, 20.0)
        assert stack.relay.swapped_rtp >= 20
        assert stack.relay.dropped_rtp >= 10
        assert _gaps(stream) == 0
        played_own = frames - stack.relay.dropped_rtp
        assert audio.jitter.late <= 0.01 * frames  # reordering broke at most 1 %
        assert audio.frames_fec_recovered >= 3
        broken = audio.frames_concealed + audio.frames_lost + audio.jitter.late
        print(
            f"played {played_own} own, fec {audio.frames_fec_recovered}, concealed "
            f"{audio.frames_concealed}, lost {audio.frames_lost}, late {audio.jitter.late}, "
            f"delay {audio.jitter.delay_ms:.1f} ms, target {audio.jitter.target_ms:.1f} ms"
        )
        arrivals = [at for _, at in stream.arrivals]
        span = arrivals[frames - 10] - arrivals[10]
        print(f"bridge frames per second: {(frames - 20) / span:.2f}")
        assert broken <= stack.relay.dropped_rtp + 10  # PLC only where FEC had nothing
        assert session.frames_fec_recovered == audio.frames_fec_recovered
        assert session.frames_concealed == audio.frames_concealed
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_a_dtx_pause_is_silence_not_loss() -> None:
    """The caller sends nothing for 0.5 s and goes on with RTP timestamps of real time and
    no sequence gap (what DTX does): the bridge gets silence for it, counted as DTX, no
    loss, no concealment."""
    stack = await Stack.start(receive_path="adaptive")
    stack.bridge.record_arrivals = True
    client = Client(tone=OpusToneTrack(440.0, frames=200, pause=(100, 25)))
    try:
        await stack.connect("dtx", client)
        stream = await _stream(stack, "dtx")
        audio = _session(stack, "dtx")._caller_audio
        await wait_for(lambda: stream.audio_in >= 190, 20.0)  # before the stream's end
        dtx, concealed, lost = audio.frames_dtx, audio.frames_concealed, audio.frames_lost
        assert _gaps(stream) == 0
        assert dtx >= 20
        assert concealed == lost == 0
        silent = [f for f in stream.frames[:190] if not any(f.data)]
        assert len(silent) >= 20  # the pause reached the bridge as zero PCM
    finally:
        await client.close()
        await stack.stop()
