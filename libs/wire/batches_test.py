"""The StreamSessions framing as tables: how queued items fall into batches under the byte
limit, that both ways of adding audio make the same bytes, unpacking, refusals."""

from __future__ import annotations

import pytest

from libs.wire.batches import (
    RequestBatches,
    ResponseBatches,
    item_size,
    refusal,
    session_requests,
    session_responses,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

Request = inference_pb2.StreamSessionRequest
Response = inference_pb2.StreamSessionResponse

# (case, limit in bytes, frames queued as (session id, sequence, data bytes), the batches
# that come out as [(session id, sequence), ...]). An item counts its data + session id + 32.
PACKING = [
    ("nothing queued", 1000, [], []),
    (
        "under the limit: one batch, order kept",
        1000,
        [("a", 0, 100), ("b", 0, 100), ("a", 1, 100)],
        [[("a", 0), ("b", 0), ("a", 1)]],
    ),
    (
        "closes before the item that would pass the limit",
        400,
        [("a", 0, 150), ("a", 1, 150), ("a", 2, 150)],
        [[("a", 0), ("a", 1)], [("a", 2)]],
    ),
    (
        "an item over the limit goes alone, nothing lost",
        400,
        [("a", 0, 100), ("b", 0, 1000), ("a", 1, 100)],
        [[("a", 0)], [("b", 0)], [("a", 1)]],
    ),
]


def frame_request(data: bytes, sequence: int) -> Request:
    frame = inference_pb2.AudioFrame(data=data, sequence=sequence, timestamp_samples=sequence * 480)
    return Request(audio_frame=frame)


def drain_requests(batches: RequestBatches) -> list[inference_pb2.StreamSessionsRequest]:
    out: list[inference_pb2.StreamSessionsRequest] = []
    for _ in range(1000):  # bounded: the tables queue far fewer
        batch = batches.take()
        if batch is None:
            return out
        out.append(batch)
    raise AssertionError("take() never ran dry")


@pytest.mark.parametrize(("case", "limit", "frames", "expected"), PACKING)
@pytest.mark.parametrize("way", ["add_audio", "add"])
def test_requests_pack_into_batches_under_the_limit(
    case: str,
    limit: int,
    frames: list[tuple[str, int, int]],
    expected: list[list[tuple[str, int]]],
    way: str,
) -> None:
    batches = RequestBatches(limit)
    for session_id, sequence, size in frames:
        if way == "add_audio":
            batches.add_audio(session_id, bytes(size), sequence, sequence * 480)
        else:
            batches.add(session_id, frame_request(bytes(size), sequence))
    assert batches.items == len(frames)
    out = drain_requests(batches)
    assert batches.items == 0
    got = [[(sid, r.audio_frame.sequence) for sid, r in session_requests(b)] for b in out]
    assert got == expected, case
    for batch in out:
        if len(batch.items) > 1:
            assert batch.ByteSize() <= limit, case


@pytest.mark.parametrize(("case", "limit", "frames", "expected"), PACKING)
def test_responses_pack_the_same_way(
    case: str,
    limit: int,
    frames: list[tuple[str, int, int]],
    expected: list[list[tuple[str, int]]],
) -> None:
    batches = ResponseBatches(limit)
    for session_id, sequence, size in frames:
        frame = inference_pb2.AudioFrame(data=bytes(size), sequence=sequence)
        batches.add(session_id, Response(audio_frame=frame))
    out: list[inference_pb2.StreamSessionsResponse] = []
    while (batch := batches.take()) is not None and len(out) < 1000:
        out.append(batch)
    got = [[(sid, r.audio_frame.sequence) for sid, r in session_responses(b)] for b in out]
    assert got == expected, case
    assert batches.items == 0


def test_a_batch_may_fill_the_limit_exactly() -> None:
    batches = RequestBatches(2 * item_size("a", 150))
    for session_id, sequence in [("a", 0), ("b", 0), ("a", 1)]:
        batches.add_audio(session_id, bytes(150), sequence, 0)
    got = [
        [(s, r.audio_frame.sequence) for s, r in session_requests(b)]
        for b in drain_requests(batches)
    ]
    assert got == [[("a", 0), ("b", 0)], [("a", 1)]]


# (session id, data bytes, sequence): what one caller frame looks like, from small to large.
FRAMES = [
    ("s", 0, 0),
    ("3f2b8c1e-session", 960, 1),
    ("x" * 64, 1920, 50 * 3600),  # an hour into the call
    ("x" * 127, 100_000, 2**20),
]


@pytest.mark.parametrize(("session_id", "size", "sequence"), FRAMES)
def test_audio_built_in_place_is_the_same_item(session_id: str, size: int, sequence: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    in_place, copied = RequestBatches(), RequestBatches()
    in_place.add_audio(session_id, data, sequence, sequence * 480)
    copied.add(session_id, frame_request(data, sequence))
    a, b = in_place.take(), copied.take()
    assert a is not None
    assert b is not None
    assert a.SerializeToString() == b.SerializeToString()
    assert list(session_requests(a)) == [(session_id, frame_request(data, sequence))]
    # The estimate covers what the item really adds to its batch.
    assert a.ByteSize() <= item_size(session_id, size)


def test_every_kind_of_message_keeps_its_order_per_session() -> None:
    start = Request(session_start=inference_pb2.SessionStart(session_id="a"))
    event = Request(data_channel_message=inference_pb2.DataChannelMessage(json="{}"))
    end = Request(
        session_end=inference_pb2.SessionEnd(reason=common_pb2.CLOSE_REASON_CLIENT_HANGUP)
    )
    batches = RequestBatches()
    queued = [("a", start), ("b", start), ("a", event), ("a", end), ("b", end)]
    for session_id, request in queued:
        batches.add(session_id, request)
    batch = batches.take()
    assert batch is not None
    assert list(session_requests(batch)) == queued
    assert batches.take() is None


def test_clear_forgets_everything_queued() -> None:
    batches = RequestBatches(400)
    for sequence in range(5):
        batches.add_audio("a", bytes(150), sequence, 0)
    batches.clear()
    assert batches.items == 0
    assert batches.take() is None
    batches.add_audio("a", bytes(10), 9, 0)  # usable again
    batch = batches.take()
    assert batch is not None
    assert [r.audio_frame.sequence for _, r in session_requests(batch)] == [9]


@pytest.mark.parametrize(
    ("code", "details", "detail"),
    [
        (
            "RESOURCE_EXHAUSTED",
            "bridge at max_sessions=2",
            "RESOURCE_EXHAUSTED: bridge at max_sessions=2",
        ),
        (
            "ALREADY_EXISTS",
            "session a already has a stream",
            "ALREADY_EXISTS: session a already has a stream",
        ),
        ("UNAVAILABLE", "", "UNAVAILABLE: "),
    ],
)
def test_refusal_is_a_bridge_error_named_by_its_status(
    code: str, details: str, detail: str
) -> None:
    end = refusal(code, details).session_end
    assert end.reason == common_pb2.CLOSE_REASON_BRIDGE_ERROR
    assert end.detail == detail
