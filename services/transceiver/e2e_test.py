"""An aiortc client through a framing UDP relay to the transceiver (real gRPC, one real UDP
port) and an echoing inference bridge, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json

import numpy as np
import pytest

from services.transceiver.session import Session
from services.transceiver.testkit import Client, Stack, peak_frequency, rms
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2
from voiceedge.transceiver.v1 import transceiver_pb2


async def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    """Polls a cheap in-memory condition every 10 ms, bounded in time."""
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def next_event(client: Client, kind: str, timeout_s: float = 5.0) -> dict[str, object]:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await client.events.get()
            if event.get("type") == kind:
                return event


@pytest.mark.timeout_s(60)
async def test_call_connects_echoes_tone_and_events_then_closes_once() -> None:
    stack = await Stack.start()
    client = Client(tone_hz=440.0)
    try:
        await stack.connect("s1", client)
        async with asyncio.timeout(10):
            await client.connected.wait()
        session = stack.manager.find("s1")
        assert isinstance(session, Session)
        await wait_for(lambda: session.state == transceiver_pb2.SESSION_STATE_CONNECTED)

        # Data channel, both ways: the echo bridge sends the client's event back.
        await wait_for(lambda: client.channel.readyState == "open")
        client.channel.send(json.dumps({"type": "session.update", "n": 1}))
        echoed = await next_event(client, "session.update")
        assert echoed["n"] == 1
        assert stack.bridge.streams["s1"].events_in == ['{"type": "session.update", "n": 1}']

        # Audio, both ways: the tone comes back at the same frequency.
        async with asyncio.timeout(10):
            await client.got_audio.wait()
        start = len(client.frames)
        await wait_for(lambda: len(client.frames) >= start + 50)
        samples = np.concatenate(client.frames[start + 10 : start + 50])
        assert rms(samples) > 1000
        assert peak_frequency(samples, client.frame_rate) == pytest.approx(440.0, rel=0.05)

        info = (
            await stack.stub.GetSession(transceiver_pb2.GetSessionRequest(session_id="s1"))
        ).session
        assert info.stats.ice_state == "completed"
        assert info.stats.dtls_state == "connected"
        assert info.stats.selected_remote_address.ip == "127.0.0.1"
        assert info.stats.selected_local_address.port == stack.relay.address[1]
        assert info.stats.audio_frames_in > 0
        assert info.stats.audio_frames_out > 0
        assert info.stats.time_to_first_audio_in_ms > 0
        assert info.stats.time_to_first_audio_out_ms > 0
        assert info.stats.bytes_received > 0
        # RTP both ways on our own path (rtp.py): its counters, RFC 3550 loss and jitter.
        assert info.stats.packets_received > 50
        assert info.stats.packets_sent > 50
        assert info.stats.packets_lost == 0
        assert 0 <= info.stats.jitter_ms < 20
        assert info.bridge_address == stack.bridge.address
        # The bridge implements StreamSessions, so this session rode the batched stream.
        batched = stack.manager.batched_for(stack.bridge.address)
        assert batched.batches_out > 0
        assert batched.batches_in > 0
        assert not batched.unimplemented

        # RTT from RTCP: the caller's receiver reports answer the sender reports aiortc
        # builds from what our RTP path recorded (every 0.5-1.5 s).
        async def rtt_ms() -> float:
            request = transceiver_pb2.GetSessionRequest(session_id="s1")
            return float((await stack.stub.GetSession(request)).session.stats.rtt_ms)

        for _ in range(100):  # polls an RPC: at most 100 x 0.1 s
            if (rtt := await rtt_ms()) > 0:
                break
            await asyncio.sleep(0.1)
        assert 0 < rtt < 500

        # Our RTCP receiver reports reach the caller: its sender sees them as
        # remote-inbound-rtp, with RTT from its own sender reports and no loss.
        remote: object = None
        for _ in range(100):  # polls the client's stats: at most 100 x 0.1 s
            report = await client.pc.getStats()
            remote = next(
                (
                    e
                    for e in report.values()
                    if getattr(e, "type", "") == "remote-inbound-rtp"
                    and getattr(e, "roundTripTime", None)
                ),
                None,
            )
            if remote is not None:
                break
            await asyncio.sleep(0.1)
        assert remote is not None, "the caller never got a receiver report with an RTT"
        assert getattr(remote, "packetsLost", None) == 0

        closed = await stack.stub.CloseSession(transceiver_pb2.CloseSessionRequest(session_id="s1"))
        assert closed.session.state == transceiver_pb2.SESSION_STATE_CLOSED
        assert closed.session.stats.close_reason == common_pb2.CLOSE_REASON_CLOSE_RPC
        again = await stack.stub.CloseSession(transceiver_pb2.CloseSessionRequest(session_id="s1"))
        assert again.session.stats.close_reason == common_pb2.CLOSE_REASON_CLOSE_RPC
        async with asyncio.timeout(5):
            await stack.bridge.streams["s1"].ended.wait()
        assert stack.bridge.streams["s1"].end_reason == common_pb2.CLOSE_REASON_CLOSE_RPC
        assert stack.mux.session_count == 0
        assert stack.mux.bound_addresses == 0
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_opus_passthrough_echoes_the_tone_undecoded() -> None:
    stack = await Stack.start()
    client = Client(tone_hz=440.0)
    try:
        await stack.connect("p", client, opus_passthrough=True)
        async with asyncio.timeout(10):
            await client.got_audio.wait()
        stream = stack.bridge.streams["p"]
        assert stream.passthrough
        assert stream.input_format is not None
        assert stream.input_format.encoding == common_pb2.AUDIO_ENCODING_OPUS
        start = len(client.frames)
        await wait_for(lambda: len(client.frames) >= start + 50)
        samples = np.concatenate(client.frames[start + 10 : start + 50])
        assert peak_frequency(samples, client.frame_rate) == pytest.approx(440.0, rel=0.05)
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_barge_in_clears_queued_audio_at_once() -> None:
    stack = await Stack.start(jitter_buffer_frames=2)
    stack.bridge.echo = False
    client = Client(tone_hz=440.0)
    try:
        await stack.connect("s1", client)
        async with asyncio.timeout(10):
            await stack.bridge.opened.wait()
        stream = stack.bridge.streams["s1"]
        session = stack.manager.find("s1")
        assert isinstance(session, Session)
        # 5 s of 24 kHz tone at once, far faster than real time: it queues in the transceiver.
        t = np.arange(24000 * 5) / 24000.0
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 660.0 * t)).astype(np.int16).tobytes()
        for offset in range(0, len(tone), 960):
            frame = inference_pb2.AudioFrame(data=tone[offset : offset + 960])
            stream.inject.put_nowait(inference_pb2.StreamSessionResponse(audio_frame=frame))
        async with asyncio.timeout(10):
            await client.got_audio.wait()
        assert session.playout.queued > 100

        stream.inject.put_nowait(
            inference_pb2.StreamSessionResponse(clear=inference_pb2.ClearAudio())
        )
        cleared = await next_event(client, "output_audio_buffer.cleared")
        assert cleared == {"type": "output_audio_buffer.cleared"}
        assert session.playout.queued == 0
        # Within a bounded number of frames (client jitter buffer included) the client
        # hears silence, and keeps hearing it.
        mark = len(client.frames)
        await wait_for(lambda: len(client.frames) >= mark + 40)
        tail = client.frames[mark + 15 : mark + 40]
        assert max(rms(f) for f in tail) < 50

        # Turn-taking events reach the data channel as JSON events.
        stream.inject.put_nowait(
            inference_pb2.StreamSessionResponse(
                speech_started=inference_pb2.SpeechStarted(audio_start_ms=120, item_id="it1")
            )
        )
        started = await next_event(client, "input_audio_buffer.speech_started")
        assert started["item_id"] == "it1"
        assert started["audio_start_ms"] == 120
    finally:
        await client.close()
        await stack.stop()


@pytest.mark.timeout_s(60)
async def test_bridge_without_stream_sessions_gets_one_stream_per_session() -> None:
    stack = await Stack.start()
    stack.bridge.batching = False  # StreamSessions answers UNIMPLEMENTED
    clients = [Client(tone_hz=440.0, pre_encoded=True) for _ in range(2)]
    try:
        for i, client in enumerate(clients):
            await stack.connect(f"u{i}", client)
            async with asyncio.timeout(10):
                await client.connected.wait()
            await wait_for(lambda i=i: stack.bridge.streams.get(f"u{i}") is not None)
        await wait_for(lambda: all(s.audio_in > 10 for s in stack.bridge.streams.values()))
        batched = stack.manager.batched_for(stack.bridge.address)
        assert batched.unimplemented
        assert batched.batches_out <= 1  # the first session's try; the second did not try
        for i in range(2):
            session = stack.manager.find(f"u{i}")
            assert isinstance(session, Session)
            assert session.state == transceiver_pb2.SESSION_STATE_CONNECTED
    finally:
        for client in clients:
            await client.close()
        await stack.stop()


@pytest.mark.parametrize("passthrough", [False, True])
@pytest.mark.timeout_s(60)
async def test_lost_caller_packets_are_concealed_or_left_as_gaps(passthrough: bool) -> None:
    stack = await Stack.start()
    stack.bridge.record_arrivals = True
    client = Client(tone_hz=440.0, pre_encoded=True)
    try:
        await stack.connect("l", client, opus_passthrough=passthrough)
        await wait_for(lambda: stack.bridge.streams.get("l") is not None)
        stream = stack.bridge.streams["l"]
        await wait_for(lambda: stream.audio_in >= 10)
        stack.relay.drop_rtp_every = 10  # 10 % loss on the caller's path from now on
        await wait_for(lambda: stack.relay.dropped_rtp >= 5)
        await wait_for(lambda: stream.audio_in >= len(stream.arrivals) and stream.audio_in >= 80)
        sequences = [sequence for sequence, _ in stream.arrivals]
        gaps = sum(b - a - 1 for a, b in itertools.pairwise(sequences) if b > a + 1)
        if passthrough:
            assert gaps >= 5  # one missing sequence number per lost Opus packet
        else:
            assert gaps == 0  # PCM: concealment fills each lost 20 ms
        assert sequences == sorted(sequences)
    finally:
        await client.close()
        await stack.stop()
