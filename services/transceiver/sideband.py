"""Where a session's server events go: the caller's `oai-events` data channel and every
sideband reader (TransceiverService.StreamSessionEvents)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiortc import RTCDataChannel

from libs.observability.telemetry import log_event
from services.transceiver.realtime_events import SIDEBAND_BACKLOG_MAX

logger = logging.getLogger("voiceedge.transceiver.session")

DATA_CHANNEL_LABEL = "oai-events"


class Sideband:
    """One reader of a session's server events (TransceiverService.StreamSessionEvents):
    a bounded queue; None marks the end (session closed, or the reader fell behind)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(SIDEBAND_BACKLOG_MAX + 1)
        self.behind = False
        self._ended = False

    def put(self, text: str) -> bool:
        """False (and the stream ends) when the reader is SIDEBAND_BACKLOG_MAX behind."""
        if self._ended:
            return False
        if self._queue.qsize() >= SIDEBAND_BACKLOG_MAX:
            self.behind = True
            self.end()
            return False
        self._queue.put_nowait(text)
        return True

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(None)

    async def get(self) -> str | None:
        return await self._queue.get()


class ServerEvents:
    """The data channel (events wait, up to `pending_max`, until it opens) and the
    sidebands of one session."""

    def __init__(self, session_id: str, pending_max: int) -> None:
        self._session_id = session_id
        self._pending_max = pending_max
        self._channel: RTCDataChannel | None = None
        self._pending: list[str] = []
        self._sidebands: set[Sideband] = set()

    def attach_channel(self, channel: RTCDataChannel, on_message: Callable[[str], None]) -> None:
        """The caller's data channel (others than `oai-events` are ignored): its text
        messages go to `on_message`; held events go out once it is open."""
        if channel.label != DATA_CHANNEL_LABEL:
            return
        self._channel = channel

        def message(text: str | bytes) -> None:
            if isinstance(text, str):
                on_message(text)

        channel.on("message", message)
        channel.on("open", self._flush)
        self._flush()

    def send(self, text: str) -> None:
        """A server event for the caller and every sideband."""
        for sideband in list(self._sidebands):
            if not sideband.put(text):
                self._sidebands.discard(sideband)
                log_event(logger, "session.sideband_behind", session__id=self._session_id)
        self.to_channel(text)

    def to_channel(self, text: str) -> None:
        """A server event for the caller only (a reply to its own client event)."""
        if len(self._pending) < self._pending_max:
            self._pending.append(text)
        self._flush()

    def _flush(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        pending, self._pending = self._pending, []
        for text in pending:
            channel.send(text)

    def attach(self) -> Sideband:
        sideband = Sideband()
        self._sidebands.add(sideband)
        return sideband

    def detach(self, sideband: Sideband) -> None:
        self._sidebands.discard(sideband)

    def end(self) -> None:
        """The session closed: every sideband's stream ends."""
        for sideband in self._sidebands:
            sideband.end()
        self._sidebands.clear()
