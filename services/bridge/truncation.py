"""Where the realtime adapter's `conversation.item.truncate` gets its `audio_end_ms`.

The transceiver answers every clear (our ClearAudio, or the caller's
`output_audio_buffer.clear` it forwarded) with one PlayoutReport, in order, whose
`next_sequence` is the AudioFrame.sequence of the first frame the caller did not hear: the
interrupted item was heard for `next_sequence - (its first frame's sequence)` frames, exact
to one frame. A transceiver that never reports (older than the report) leaves the adapter's
own estimate from its pacing, used once `REPORT_WAIT_S` has passed without a report. An
item is truncated once: what the model sends of it after the interruption never plays.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from services.bridge.audio import FRAME_MS
from services.bridge.backend import BackendError
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge.realtime")

# A transceiver answers within a round trip (milliseconds); one that has not in this long
# never will, and the model should not wait longer for its context to be fixed.
REPORT_WAIT_S = 1.0

ITEMS_REMEMBERED = 32

# (item_id, audio_end_ms) -> the conversation.item.truncate event sent
Truncate = Callable[[str, int], Awaitable[None]]


@dataclass
class _Clear:
    """A clear the transceiver will answer: what to truncate, and the fallback."""

    item_id: str  # empty: nothing was playing; the report is only consumed
    first_sequence: int  # Playout sequence of the item's first frame
    estimate_ms: int
    fallback: asyncio.Task[None] | None = field(default=None, repr=False)


class TruncationSource:
    """Pairs each clear with the transceiver's report on it (FIFO): what to truncate."""

    def __init__(self, session_id: str, wait_s: float = REPORT_WAIT_S) -> None:
        # No reference to the adapter is kept (only a pending fallback holds its sink): a
        # cycle would keep an adapter whose close() failed, and its WebSocket, alive.
        self._session_id = session_id
        self._wait_s = wait_s
        self._clears: collections.deque[_Clear] = collections.deque()
        # Items truncated already: audio the model still sends for an interrupted item is
        # dropped by the transceiver, so a later clear must not truncate it again (to 0).
        self._truncated: collections.deque[str] = collections.deque(maxlen=ITEMS_REMEMBERED)
        self.reported = 0  # truncations from a PlayoutReport
        self.estimated = 0  # truncations from the estimate (no report in time)

    def expect(
        self, item_id: str, first_sequence: int, estimate_ms: int, truncate: Truncate
    ) -> None:
        """A clear went to (or came through) the transceiver: one report will follow. If
        none comes within the wait, `truncate` gets the estimate."""
        if item_id in self._truncated:
            item_id = ""
        elif item_id:
            self._truncated.append(item_id)
        clear = _Clear(item_id, first_sequence, estimate_ms)
        clear.fallback = asyncio.create_task(
            self._fall_back(clear, truncate), name="truncate-fallback"
        )
        self._clears.append(clear)

    async def on_report(self, report: inference_pb2.PlayoutReport) -> tuple[str, int] | None:
        """The transceiver's report on the oldest clear: (item_id, audio_end_ms) to
        truncate, or None (nothing was playing, or the clear was given up on)."""
        if not self._clears:
            return None
        clear = self._clears.popleft()
        await cancel_and_wait(clear.fallback)
        if not clear.item_id:
            return None
        self.reported += 1
        frames = max(0, report.next_sequence - clear.first_sequence)
        return clear.item_id, frames * FRAME_MS

    async def _fall_back(self, clear: _Clear, truncate: Truncate) -> None:
        await asyncio.sleep(self._wait_s)
        if clear in self._clears:
            self._clears.remove(clear)
        if not clear.item_id:
            return
        self.estimated += 1
        log_event(logger, "realtime.truncate_estimated", session__id=self._session_id)
        with contextlib.suppress(BackendError):  # the WebSocket is gone: the session ends
            await truncate(clear.item_id, clear.estimate_ms)

    async def close(self) -> None:
        clears, self._clears = list(self._clears), collections.deque()
        await cancel_and_wait(*(c.fallback for c in clears))
