"""A real InferenceBridgeService that keeps every caller frame as the transceiver delivered
it (sequence number, PCM, arrival time) and sends nothing back: the audio fidelity
benchmark's ear. It is the transceiver test kit's EchoBridge (both the batched and the
per-session stream) with the echo off and the frames recorded.

`BridgeThread` serves it from a thread of its own, with its own event loop, inside a
testbed host's network namespace (setns is per thread: the listening socket is made there).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import grpc
import grpc.aio

from libs.config.settings import join_host_port
from services.transceiver.transceiver_testing import BridgeStream, EchoBridge, Resp
from tools.netsim.net import entered_namespace
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

START_TIMEOUT_S = 20.0


@dataclass
class Capture:
    """One session's caller audio at the bridge."""

    session_id: str
    sample_rate_hz: int
    frames: dict[int, bytes] = field(default_factory=dict)  # sequence -> PCM s16le
    arrivals: dict[int, float] = field(default_factory=dict)  # sequence -> monotonic s
    duplicates: int = 0

    def first_after(self, t: float) -> int | None:
        """The lowest sequence number that arrived at or after monotonic time `t`."""
        later = [s for s, at in self.arrivals.items() if at >= t]
        return min(later) if later else None


class CapturingBridge(EchoBridge):
    """Accepts every session and records its frames; no echo. The benchmark's calls do not
    ask for Opus passthrough, so the frames are PCM at `Capture.sample_rate_hz`."""

    def __init__(self, changed: threading.Condition) -> None:
        super().__init__()
        self.echo = False
        self.echo_events = False
        self.captures: dict[str, Capture] = {}
        self._changed = changed

    async def serve(self, host: str, port: int) -> None:
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server(self, self.server)
        bound = self.server.add_insecure_port(join_host_port(host, port))
        await self.server.start()
        self.address = join_host_port(host, bound)

    def _accept(self, start: inference_pb2.SessionStart) -> tuple[BridgeStream, Resp]:
        stream, accepted = super()._accept(start)
        with self._changed:
            rate = start.input_format.sample_rate_hz or 24000
            self.captures[start.session_id] = Capture(start.session_id, rate)
            self._changed.notify_all()
        return stream, accepted

    def _answer(
        self, stream: BridgeStream, request: inference_pb2.StreamSessionRequest
    ) -> Resp | None:
        if request.WhichOneof("payload") == "audio_frame":
            frame = request.audio_frame
            with self._changed:
                capture = self.captures[stream.session_id]
                if frame.sequence in capture.frames:
                    capture.duplicates += 1
                capture.frames[frame.sequence] = frame.data
                capture.arrivals[frame.sequence] = time.monotonic()
                self._changed.notify_all()
        return super()._answer(stream, request)


class BridgeThread:
    """The capturing bridge on host:port inside namespace `netns`, until the `with` ends."""

    def __init__(self, netns: str, host: str, port: int) -> None:
        self.changed = threading.Condition()
        self.bridge = CapturingBridge(self.changed)
        self._where = (netns, host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="capture-bridge", daemon=True)

    async def _serve(self) -> None:
        netns, host, port = self._where
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            with entered_namespace(netns):
                await self.bridge.serve(host, port)
        except Exception as exc:  # __enter__ reports it
            self._error = exc
            return
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.bridge.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())  # cancels what the stopped server left running

    def __enter__(self) -> BridgeThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the capturing bridge did not start")
        if self._error is not None:
            raise RuntimeError(f"the capturing bridge did not start: {self._error}")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_S)

    @property
    def address(self) -> str:
        return self.bridge.address

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Returns once `predicate` (called with the captures locked) holds; RuntimeError
        after `timeout_s`."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout_s):
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def session_ids(self) -> set[str]:
        with self.changed:
            return set(self.bridge.captures)

    def new_session(self, known: set[str], timeout_s: float) -> Capture:
        """The first session the bridge accepted that is not in `known`."""
        self.wait_for(
            "the bridge stream of the call",
            lambda: bool(set(self.bridge.captures) - known),
            timeout_s,
        )
        with self.changed:
            (session_id,) = sorted(set(self.bridge.captures) - known)[:1]
            return self.bridge.captures[session_id]

    def snapshot(self, capture: Capture) -> tuple[dict[int, bytes], dict[int, float]]:
        """Copies of a capture's frames and arrival times, taken with the captures locked."""
        with self.changed:
            return dict(capture.frames), dict(capture.arrivals)
