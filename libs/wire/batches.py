"""Messages queued for a stream's writer in batches closed at a byte size, oldest first.

Both ends of InferenceBridgeService.StreamSessions batch per-session messages, and a writer
that fell behind would otherwise put its whole backlog into one message: gRPC refuses
messages over 4 MiB by default (RESOURCE_EXHAUSTED), which ends the stream and every
session on it, and 24 kHz PCM from hundreds of sessions (~1 KB per 20 ms frame each)
reaches that within a second. inference.proto's file comment states the limit. Pure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

BATCH_BYTES_MAX = 1 << 20  # well under gRPC's default 4 MiB message limit

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
