"""Outbox and Playout bookkeeping (the paced loop itself is covered over gRPC)."""

from __future__ import annotations

from services.bridge.session import MAX_OUTBOX_EVENTS, Outbox, Playout, Response
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2


def audio() -> Response:
    return Response(audio_frame=inference_pb2.AudioFrame(data=b"\0\0"))


def speech() -> Response:
    return Response(speech_started=inference_pb2.SpeechStarted())


async def test_outbox_order_drop_audio_and_end() -> None:
    box = Outbox("s")
    for message in (audio(), speech(), audio()):
        box.put(message)
    assert box.drop_audio() == 2
    box.end(common_pb2.CLOSE_REASON_DRAINED, "bye")
    box.end(common_pb2.CLOSE_REASON_BRIDGE_ERROR, "ignored: first reason wins")
    box.put(speech())  # after close: ignored
    first, second = await box.get(), await box.get()
    assert first is not None
    assert first.HasField("speech_started")
    assert second is not None
    assert second.session_end.reason == common_pb2.CLOSE_REASON_DRAINED
    assert await box.get() is None


async def test_outbox_bounds_events_but_never_drops_session_end() -> None:
    box = Outbox("s")
    for _ in range(MAX_OUTBOX_EVENTS + 5):
        box.put(speech())
    assert box.dropped == 5
    box.end()
    count = 0
    while (message := await box.get()) is not None:
        count += 1
        last = message
    assert count == MAX_OUTBOX_EVENTS + 1
    assert last.HasField("session_end")


async def test_playout_bookkeeping_with_a_fake_clock() -> None:
    now = [100.0]
    box = Outbox("s")
    playout = Playout(box, 24000, 200, clock=lambda: now[0])
    assert not playout.audio_pending()
    assert not playout.clear()  # nothing queued or playing: no ClearAudio needed
    playout.enqueue_event(speech())  # nothing ahead of it: straight to the outbox
    assert (await box.get()) is not None
    for _ in range(3):
        playout.enqueue_audio(bytes(960))
    playout.enqueue_event(speech())  # behind the audio: waits in the playout queue
    assert playout.queued_frames == 3
    assert playout.audio_pending()
    assert playout.played_sequence() == 0
    assert playout.clear()
    assert playout.queued_frames == 0
    assert not playout.audio_pending()
