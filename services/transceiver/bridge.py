"""The transceiver's end of InferenceBridgeService.StreamSession: one bidi stream per session.

One writer task serialises writes (grpc.aio allows one pending write); a bounded outbox
drops caller audio rather than growing when the bridge is slow. The reader hands every
bridge message to the session's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

OUTBOX_MAX = 256  # about 5 s of 20 ms frames


class BridgeError(Exception):
    """The bridge refused the session or the stream broke."""


class BridgeEndedError(Exception):
    """The bridge ended the session normally (SessionEnd or half-close)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


Request = inference_pb2.StreamSessionRequest
Response = inference_pb2.StreamSessionResponse


class BridgeLink:
    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        # grpc-stubs type the generated stub as synchronous; on an aio channel it is not.
        self._stub: Any = inference_pb2_grpc.InferenceBridgeServiceStub(channel)
        self._call: Any = None
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue(OUTBOX_MAX)
        self._writer: asyncio.Task[None] | None = None
        self.accepted: inference_pb2.SessionAccepted | None = None
        self.audio_sequence = 0
        self.audio_samples = 0
        self.dropped_audio = 0
        self._ended = False

    async def open(self, start: inference_pb2.SessionStart, timeout_s: float) -> None:
        """Sends SessionStart and waits for SessionAccepted (stream protocol steps 1-2)."""
        self._call = self._stub.StreamSession()
        try:
            await asyncio.wait_for(self._call.write(Request(session_start=start)), timeout_s)
            first = await asyncio.wait_for(self._call.read(), timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise BridgeError(f"bridge {self.address}: {_describe(exc)}") from None
        if not isinstance(first, Response):  # grpc.aio.EOF
            raise BridgeError(f"bridge {self.address}: stream ended before SessionAccepted")
        if first.WhichOneof("payload") != "session_accepted":
            raise BridgeError(
                f"bridge {self.address}: expected session_accepted, got "
                f"{first.WhichOneof('payload')}"
            )
        self.accepted = first.session_accepted
        self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        assert self._call is not None
        while True:
            item = await self._outbox.get()
            if item is None:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
                return
            try:
                await self._call.write(item)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return

    async def read_loop(self, on_message: Callable[[Response], None]) -> None:
        """Dispatches bridge messages until it ends; raises BridgeEnded or BridgeError."""
        assert self._call is not None
        while True:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise BridgeError(f"bridge {self.address}: {_describe(exc)}") from None
            if not isinstance(message, Response):  # grpc.aio.EOF
                raise BridgeEndedError("bridge half-closed the stream")
            if message.WhichOneof("payload") == "session_end":
                raise BridgeEndedError(message.session_end.detail or "session_end from bridge")
            on_message(message)

    def _put(self, request: Request) -> bool:
        if self._ended or self._writer is None:
            return False
        try:
            self._outbox.put_nowait(request)
        except asyncio.QueueFull:
            return False
        return True

    def send_audio(self, data: bytes, samples: int) -> None:
        frame = inference_pb2.AudioFrame(
            data=data, sequence=self.audio_sequence, timestamp_samples=self.audio_samples
        )
        self.audio_sequence += 1
        self.audio_samples += samples
        if not self._put(Request(audio_frame=frame)):
            self.dropped_audio += 1

    def send_event(self, text: str) -> None:
        self._put(Request(data_channel_message=inference_pb2.DataChannelMessage(json=text)))

    async def close(self, reason: int, detail: str, *, notify: bool) -> None:
        """Ends the stream: SessionEnd (unless the bridge ended it), half-close, then cancel
        whatever is still pending. Idempotent."""
        if self._ended:
            return
        if notify and self._writer is not None:
            end = inference_pb2.SessionEnd(reason=reason, detail=detail)  # type: ignore[arg-type]
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(Request(session_end=end))
        self._ended = True
        if self._writer is not None:
            if notify:
                with contextlib.suppress(asyncio.QueueFull):
                    self._outbox.put_nowait(None)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._call is not None:
            self._call.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return repr(exc)


def opus_format() -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_OPUS,
        sample_rate_hz=48000,
        channels=2,
        frame_duration_ms=20,
    )


def pcm_format(rate_hz: int) -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE,
        sample_rate_hz=rate_hz,
        channels=1,
        frame_duration_ms=20,
    )
