"""Per-session plumbing shared by the backends: the outgoing message queue and the paced
audio playout.

Pacing: the transceiver plays response audio at 20 ms per frame from a bounded jitter
buffer. Sending a whole response as a burst would overflow it (or, if it grew, make barge-in
slow: everything queued there has to be cleared). So `Playout` sends frame n no earlier than
`t0 + n * 20 ms - lead`: at most `lead_ms` (default 200 ms) of audio is ever in flight ahead
of real time, enough to ride out scheduling hiccups here, little enough for a prompt clear.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable

from libs.observability.telemetry import log_event
from services.bridge.audio import BYTES_PER_SAMPLE, FRAME_MS
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge")

Response = inference_pb2.StreamSessionResponse

# Events (speech, transcripts, data-channel JSON) waiting for a stalled transceiver; past this
# they are dropped and counted. Audio is bounded separately by the playout lead.
MAX_OUTBOX_EVENTS = 1000
# Response audio queued in Playout ahead of real time (a realtime backend may send a long
# answer much faster than real time). Past this, new audio is dropped and counted.
MAX_QUEUED_AUDIO_S = 300


class Outbox:
    """Messages to yield on the gRPC response stream, in order. `close()` ends the stream
    after what is queued."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._items: collections.deque[Response] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, message: Response) -> None:
        if self._closed:
            return
        if len(self._items) >= MAX_OUTBOX_EVENTS and message.WhichOneof("payload") != "session_end":
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log_event(
                    logger,
                    "bridge.outbox_drop",
                    level=logging.WARNING,
                    session__id=self.session_id,
                    dropped=self.dropped,
                )
            return
        self._items.append(message)
        self._ready.set()

    def end(
        self,
        reason: common_pb2.CloseReason.ValueType = common_pb2.CLOSE_REASON_BRIDGE_ENDED,
        detail: str = "",
        *,
        after_playout: bool = False,
    ) -> None:
        """Sends SessionEnd and closes (idempotent: only the first reason counts).
        `after_playout`: the transceiver ends the call once the audio sent has played."""
        if self._closed:
            return
        end = inference_pb2.SessionEnd(reason=reason, detail=detail, after_playout=after_playout)
        self.put(Response(session_end=end))
        self.close()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def drop_audio(self) -> int:
        """Removes queued, not yet yielded, audio frames (barge-in)."""
        kept = [m for m in self._items if m.WhichOneof("payload") != "audio_frame"]
        dropped = len(self._items) - len(kept)
        self._items = collections.deque(kept)
        return dropped

    async def get(self) -> Response | None:
        """The next message, or None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class Playout:
    """Paced sender of 20 ms response frames into an Outbox, with in-order event markers.

    `enqueue_audio` takes whole frames of `frame_bytes`; `enqueue_event` queues a message to
    go out after the audio queued before it (e.g. ResponseDone). `clear()` drops queued audio
    (not events) for barge-in. Run `run()` as a task; cancel it to stop.
    """

    def __init__(
        self,
        outbox: Outbox,
        sample_rate_hz: int,
        lead_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._rate = sample_rate_hz
        self._lead_s = lead_ms / 1000
        self._clock = clock
        self._format = common_pb2.AudioFormat(
            encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE,
            sample_rate_hz=sample_rate_hz,
            channels=1,
            frame_duration_ms=FRAME_MS,
        )
        self._queue: collections.deque[bytes | Response] = collections.deque()
        self._queued_audio = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.sequence = 0
        self.timestamp_samples = 0
        self._t0 = 0.0
        self._sent_in_run = 0
        self._play_end = 0.0  # monotonic time the transceiver finishes what was sent
        self.dropped_frames = 0

    @property
    def max_queued_frames(self) -> int:
        return MAX_QUEUED_AUDIO_S * 1000 // FRAME_MS

    def enqueue_audio(self, frame: bytes) -> None:
        if self._queued_audio >= self.max_queued_frames:
            self.dropped_frames += 1
            return
        self._queue.append(frame)
        self._queued_audio += 1
        self._kick()

    def enqueue_event(self, message: Response) -> None:
        if not self._queue:  # nothing ahead of it: no need to wait for the task
            self._outbox.put(message)
            return
        self._queue.append(message)
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    @property
    def queued_frames(self) -> int:
        return self._queued_audio

    def played_sequence(self) -> int:
        """Estimated sequence number of the next frame the transceiver will play: frames sent
        minus those still ahead of real time in its buffer."""
        ahead_s = max(0.0, self._play_end - self._clock())
        return max(0, self.sequence - math.ceil(ahead_s / (FRAME_MS / 1000)))

    def audio_pending(self) -> bool:
        """True if audio is queued here or still playing at the transceiver."""
        return self._queued_audio > 0 or self._clock() < self._play_end

    def clear(self) -> bool:
        """Barge-in: drops queued audio here and in the outbox. Returns whether any audio was
        queued or still playing (i.e. whether the transceiver must be told to clear)."""
        pending = self.audio_pending()
        self._queue = collections.deque(m for m in self._queue if not isinstance(m, bytes))
        self._queued_audio = 0
        pending = self._outbox.drop_audio() > 0 or pending
        self._play_end = 0.0
        self._sent_in_run = 0
        if not self._queue:
            self._idle.set()
        return pending

    async def wait_sent(self) -> None:
        """Until everything queued so far has been handed to the outbox."""
        await self._idle.wait()

    async def run(self) -> None:
        frame_s = FRAME_MS / 1000
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue[0]
            if not isinstance(item, bytes):
                self._queue.popleft()
                self._outbox.put(item)
                continue
            now = self._clock()
            if self._sent_in_run == 0 or now > self._t0 + self._sent_in_run * frame_s:
                # Idle or underrun: the transceiver's buffer is empty, start a new run now.
                self._t0 = now
                self._sent_in_run = 0
            due = self._t0 + self._sent_in_run * frame_s - self._lead_s
            if due > now:
                await asyncio.sleep(due - now)
                continue  # the queue may have been cleared meanwhile
            self._queue.popleft()
            self._queued_audio -= 1
            self._outbox.put(
                Response(
                    audio_frame=inference_pb2.AudioFrame(
                        data=item,
                        format=self._format,
                        sequence=self.sequence,
                        timestamp_samples=self.timestamp_samples,
                    )
                )
            )
            self.sequence += 1
            self.timestamp_samples += len(item) // BYTES_PER_SAMPLE
            self._sent_in_run += 1
            self._play_end = self._t0 + self._sent_in_run * frame_s
