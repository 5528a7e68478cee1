"""The framing of InferenceBridgeService.StreamSessions (inference.proto), for both ends.

Each message on that stream is a batch of per-session messages, an item naming its session;
order is kept per session. `RequestBatches` (the transceiver's side) and `ResponseBatches`
(the bridge's) pack what a writer has queued into batches closed at a byte size, oldest
first; `session_requests` / `session_responses` unpack a received batch; `refusal` is how a
bridge refuses one session on the shared stream.

Why a byte limit: a writer that fell behind would otherwise put its whole backlog into one
message. gRPC refuses messages over 4 MiB by default (RESOURCE_EXHAUSTED), which ends the
stream and every session on it, and 24 kHz PCM from hundreds of sessions (~1 KB per 20 ms
frame each) reaches that within a second. inference.proto's file comment states the limit.
Pure: no sockets, no event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

BATCH_BYTES_MAX = 1 << 20  # well under gRPC's default 4 MiB message limit
# Bytes an item adds around its message (tags and lengths of the item, its session id and
# its message; for an audio frame counted by its data, also the frame's numbers): about 20
# for a 20 ms frame, so 32 keeps batches under the limit.
ITEM_OVERHEAD_BYTES = 32

B = TypeVar("B")


class SizedBatches(Generic[B]):
    """Batches made by `new()` (a protobuf batch message, a list, ...): `room(size)` is the
    batch to add one item of about `size` bytes to, a new one once the current one would
    pass `limit` bytes (an item larger than that gets a batch of its own); `take()` hands
    the writer the oldest batch."""

    def __init__(self, new: Callable[[], B], limit: int = BATCH_BYTES_MAX) -> None:
        self._new = new
        self._limit = limit
        self._current = new()
        self._current_items = 0
        self._current_bytes = 0
        self._full: deque[tuple[B, int]] = deque()  # closed batches and their item counts
        self.items = 0  # queued in all batches

    def room(self, size: int) -> B:
        if self._current_items and self._current_bytes + size > self._limit:
            self._full.append((self._current, self._current_items))
            self._current, self._current_items, self._current_bytes = self._new(), 0, 0
        self._current_items += 1
        self._current_bytes += size
        self.items += 1
        return self._current

    def take(self) -> B | None:
        """The oldest batch with anything in it, or None."""
        if self._full:
            batch, count = self._full.popleft()
        elif self._current_items:
            batch, count = self._current, self._current_items
            self._current, self._current_items, self._current_bytes = self._new(), 0, 0
        else:
            return None
        self.items -= count
        return batch

    def clear(self) -> None:
        self._full.clear()
        self._current, self._current_items, self._current_bytes = self._new(), 0, 0
        self.items = 0


Request = inference_pb2.StreamSessionRequest
Response = inference_pb2.StreamSessionResponse
BatchRequest = inference_pb2.StreamSessionsRequest
BatchResponse = inference_pb2.StreamSessionsResponse


def item_size(session_id: str, message_bytes: int) -> int:
    """What an item of `message_bytes` for `session_id` counts against the limit."""
    return message_bytes + len(session_id) + ITEM_OVERHEAD_BYTES


class _SessionBatches(Generic[B]):
    """Items of one direction of StreamSessions in batches of type B (the generated batch
    message) under `limit` bytes."""

    def __init__(self, new: Callable[[], B], limit: int) -> None:
        self._batches = SizedBatches(new, limit)

    @property
    def items(self) -> int:
        """Items queued in all batches."""
        return self._batches.items

    def take(self) -> B | None:
        """The oldest batch with anything in it, or None."""
        return self._batches.take()

    def clear(self) -> None:
        self._batches.clear()


class RequestBatches(_SessionBatches[BatchRequest]):
    """Transceiver -> bridge: per-session requests queued into StreamSessionsRequest batches.
    Audio frames are written straight into the batch (`add_audio`): no per-frame message is
    built and copied."""

    def __init__(self, limit: int = BATCH_BYTES_MAX) -> None:
        super().__init__(BatchRequest, limit)

    def add(self, session_id: str, request: Request) -> None:
        batch = self._batches.room(item_size(session_id, request.ByteSize()))
        batch.items.add(session_id=session_id, request=request)

    def add_audio(
        self, session_id: str, data: bytes, sequence: int, timestamp_samples: int
    ) -> None:
        """Queues a session's AudioFrame request (data, sequence, timestamp_samples)."""
        item = self._batches.room(item_size(session_id, len(data))).items.add()
        item.session_id = session_id
        frame = item.request.audio_frame
        frame.data = data
        frame.sequence = sequence
        frame.timestamp_samples = timestamp_samples


class ResponseBatches(_SessionBatches[BatchResponse]):
    """Bridge -> transceiver: per-session responses queued into StreamSessionsResponse
    batches."""

    def __init__(self, limit: int = BATCH_BYTES_MAX) -> None:
        super().__init__(BatchResponse, limit)

    def add(self, session_id: str, response: Response) -> None:
        batch = self._batches.room(item_size(session_id, response.ByteSize()))
        batch.items.add(session_id=session_id, response=response)


def session_requests(batch: BatchRequest) -> Iterator[tuple[str, Request]]:
    """(session id, request) of each item of a received batch, in order."""
    for item in batch.items:
        yield item.session_id, item.request


def session_responses(batch: BatchResponse) -> Iterator[tuple[str, Response]]:
    """(session id, response) of each item of a received batch, in order."""
    for item in batch.items:
        yield item.session_id, item.response


def refusal(code_name: str, details: str) -> Response:
    """A session refused on the shared stream: its session_end, CLOSE_REASON_BRIDGE_ERROR
    with a detail that starts with the gRPC status code name (e.g. "RESOURCE_EXHAUSTED: ..."),
    where StreamSession would have ended the stream with that status."""
    return Response(
        session_end=inference_pb2.SessionEnd(
            reason=common_pb2.CLOSE_REASON_BRIDGE_ERROR, detail=f"{code_name}: {details}"
        )
    )
