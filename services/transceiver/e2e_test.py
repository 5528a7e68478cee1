"""An aiortc client through a framing UDP relay to the transceiver (real gRPC, one real UDP
port) and an echoing inference bridge, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from services.transceiver.session import Session
from services.transceiver.transceiver_testing import (
    BridgeStream,
    Client,
    Stack,
    next_event,
    peak_frequency,
    rms,
    wait_for,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2
from voiceedge.transceiver.v1 import transceiver_pb2


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

        # Data channel, both ways: session.created first; session.update is answered by the
        # transceiver and handed to the bridge, whose reply comes back with an event_id.
        await wait_for(lambda: client.channel.readyState == "open")
        created = await next_event(client, "session.created")
        assert created["session"]["type"] == "realtime"
        assert created["event_id"]
        update = json.dumps({"type": "session.update", "session": {"instructions": "hi"}})
        client.channel.send(update)
        updated = await next_event(client, "session.updated")
        assert updated["session"]["instructions"] == "hi"
        echoed = await next_event(client, "session.update")
        assert echoed["event_id"] not in (created["event_id"], updated["event_id"])
        assert stack.bridge.streams["s1"].events_in == [update]

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
        batched = stack.manager.bridges.batched_for(stack.bridge.address)
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
        stream, session = await _open(stack, client)
        # 5 s of 24 kHz tone at once, far faster than real time: it queues in the transceiver.
        _inject_tone(stream, 5.0)
        async with asyncio.timeout(10):
            await client.got_audio.wait()
        assert session.playout.queued > 100
        started = await next_event(client, "output_audio_buffer.started")
        assert started["response_id"] == ""  # audio with no ResponseStarted

        stream.inject.put_nowait(
            inference_pb2.StreamSessionResponse(clear=inference_pb2.ClearAudio())
        )
        cleared = await next_event(client, "output_audio_buffer.cleared")
        assert cleared == {
            "type": "output_audio_buffer.cleared",
            "event_id": cleared["event_id"],
            "response_id": "",
        }
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
        batched = stack.manager.bridges.batched_for(stack.bridge.address)
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


@pytest.mark.timeout_s(60)
async def test_client_clear_drops_playout_and_reaches_the_bridge() -> None:
    stack = await Stack.start(jitter_buffer_frames=2)
    stack.bridge.echo = False
    stack.bridge.echo_events = False
    client = Client(tone_hz=440.0)
    try:
        stream, session = await _open(stack, client)
        stream.inject.put_nowait(
            inference_pb2.StreamSessionResponse(
                response_started=inference_pb2.ResponseStarted(response_id="resp_9")
            )
        )
        _inject_tone(stream, 3.0)
        started = await next_event(client, "output_audio_buffer.started", 10)
        assert started["response_id"] == "resp_9"
        await wait_for(lambda: session.frames_out == 150)  # all 3 s arrived, most queued
        assert session.playout.queued > 50
        client.channel.send('{"type":"output_audio_buffer.clear","event_id":"c1"}')
        cleared = await next_event(client, "output_audio_buffer.cleared")
        assert cleared["response_id"] == "resp_9"
        assert session.playout.queued == 0
        await wait_for(lambda: '"output_audio_buffer.clear"' in "".join(stream.events_in))
        # A response that was cleared ends without output_audio_buffer.stopped.
        stream.inject.put_nowait(
            inference_pb2.StreamSessionResponse(
                response_done=inference_pb2.ResponseDone(response_id="resp_9", cancelled=True)
            )
        )
        done = await next_event(client, "response.done")
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        client.channel.send('{"type":"ping"}')  # a marker: events up to here arrived
        await wait_for(lambda: '"ping"' in "".join(stream.events_in))
        assert all(e.get("type") != "output_audio_buffer.stopped" for e in _drain(client))
    finally:
        await client.close()
        await stack.stop()


async def _open(stack: Stack, client: Client) -> tuple[BridgeStream, Session]:
    """Session "s1" for `client`, once its bridge stream is open."""
    await stack.connect("s1", client)
    async with asyncio.timeout(10):
        await stack.bridge.opened.wait()
    session = stack.manager.find("s1")
    assert isinstance(session, Session)
    return stack.bridge.streams["s1"], session


def _inject_tone(stream: BridgeStream, seconds: float) -> None:
    """A 660 Hz answer from the bridge, 24 kHz PCM in 20 ms frames, all at once."""
    t = np.arange(int(24000 * seconds)) / 24000.0
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 660.0 * t)).astype(np.int16).tobytes()
    for offset in range(0, len(tone), 960):
        frame = inference_pb2.AudioFrame(data=tone[offset : offset + 960])
        stream.inject.put_nowait(inference_pb2.StreamSessionResponse(audio_frame=frame))


def _drain(client: Client) -> list[dict[str, object]]:
    out = []
    while not client.events.empty():
        out.append(client.events.get_nowait())
    return out


@pytest.mark.timeout_s(60)
async def test_sideband_sees_every_event_and_steers_the_session() -> None:
    stack = await Stack.start()
    stack.bridge.echo_events = False
    client = Client(tone_hz=440.0)
    try:
        await stack.connect("s1", client)
        async with asyncio.timeout(10):
            await stack.bridge.opened.wait()
        await wait_for(lambda: client.channel.readyState == "open")
        await next_event(client, "session.created")
        sideband = stack.stub.StreamSessionEvents()
        await sideband.write(transceiver_pb2.StreamSessionEventsRequest(session_id="s1"))

        async def next_sideband(kind: str) -> dict[str, Any]:
            async with asyncio.timeout(5):
                while True:
                    response = await sideband.read()
                    event: dict[str, Any] = json.loads(response.server_event)
                    if event["type"] == kind:
                        return event

        created = await next_sideband("session.created")
        assert created["session"]["type"] == "realtime"
        update = {"type": "session.update", "session": {"instructions": "from the server"}}
        await sideband.write(
            transceiver_pb2.StreamSessionEventsRequest(client_event=json.dumps(update))
        )
        on_sideband = await next_sideband("session.updated")
        on_channel = await next_event(client, "session.updated")
        assert on_sideband == on_channel
        assert on_channel["session"]["instructions"] == "from the server"
        stream = stack.bridge.streams["s1"]
        await wait_for(lambda: json.dumps(update) in stream.events_in)
        # A bridge event reaches both; a malformed client event is answered on the sideband
        # only.
        stream.inject.put_nowait(
            inference_pb2.StreamSessionResponse(
                speech_started=inference_pb2.SpeechStarted(audio_start_ms=5, item_id="i1")
            )
        )
        assert (await next_sideband("input_audio_buffer.speech_started"))["item_id"] == "i1"
        assert (await next_event(client, "input_audio_buffer.speech_started"))["item_id"] == "i1"
        await sideband.write(transceiver_pb2.StreamSessionEventsRequest(client_event="{nope"))
        error = await next_sideband("error")
        assert error["error"]["code"] == "invalid_json"
        # The session closes: the sideband ends with OK.
        await stack.stub.CloseSession(transceiver_pb2.CloseSessionRequest(session_id="s1"))
        async with asyncio.timeout(5):
            while await sideband.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        assert await sideband.code() == grpc.StatusCode.OK
        assert all(e.get("type") != "error" for e in _drain(client))
        # Attaching to a closed session is NOT_FOUND.
        late = stack.stub.StreamSessionEvents()
        await late.write(transceiver_pb2.StreamSessionEventsRequest(session_id="s1"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await late.read()
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await client.close()
        await stack.stop()
