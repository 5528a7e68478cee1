"""Bridge figures: VAD + turn detection cost per frame, echo playout pacing, barge-in latency,
and the servicer's own CPU per frame pair (a backend that only echoes) on both RPCs.

Run: ./bazelw run //tests/bench:bridge_bench -- [--sessions N]
Prints figures; asserts nothing. Everything runs in-process over real gRPC on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from services.bridge.bridge_testing import (
    FRAME_SAMPLES,
    audio_requests,
    read,
    serve,
    session_start,
    silence,
    tone,
)
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from services.bridge.turns import TurnConfig, TurnDetector, VoiceActivity
from voiceedge.inference.v1 import inference_pb2


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def vad_cost() -> None:
    signal = np.concatenate([tone(440, 5.0), silence(5.0)])
    vad = VoiceActivity(2, 24000)
    detector = TurnDetector(TurnConfig())
    frames = [signal[i : i + FRAME_SAMPLES] for i in range(0, len(signal), FRAME_SAMPLES)]
    start = time.perf_counter()
    for frame in frames:
        for decision in vad.feed(frame):
            detector.feed(decision)
    per_frame_us = (time.perf_counter() - start) / len(frames) * 1e6
    print(f"vad+turns per 20 ms frame (24 kHz -> 16 kHz, webrtcvad mode 2): {per_frame_us:.1f} us")
    print(f"  -> one core keeps up with ~{20000 / per_frame_us:.0f} sessions' caller audio")


async def pacing() -> None:
    async with serve(BridgeServicer(BridgeSettings())) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        await read(call)
        for request in audio_requests(np.concatenate([tone(440, 2.0), silence(1.0)])):
            await call.write(request)
        arrivals: list[float] = []
        for _ in range(1000):
            message = await read(call)
            if message is None or message.HasField("response_done"):
                break
            if message.HasField("audio_frame"):
                arrivals.append(time.monotonic())
        call.cancel()
    burst = sum(1 for t in arrivals if t - arrivals[0] < 0.005)
    gaps_ms = [
        (b - a) * 1000 for a, b in zip(arrivals[burst:], arrivals[burst + 1 :], strict=False)
    ]
    span_s = arrivals[-1] - arrivals[0]
    print(
        f"echo playout: {len(arrivals)} frames ({len(arrivals) * 20} ms of audio) in {span_s:.3f} s"
    )
    print(f"  initial burst (lead): {burst} frames; then inter-frame gap ms:")
    print(
        f"  mean {statistics.mean(gaps_ms):.2f}  p50 {percentile(gaps_ms, 50):.2f}  "
        f"p99 {percentile(gaps_ms, 99):.2f}  max {max(gaps_ms):.2f}"
    )


async def barge_in(sessions: int) -> None:
    latencies_ms: list[float] = []
    async with serve(BridgeServicer(BridgeSettings())) as stub:
        for index in range(sessions):
            call = stub.StreamSession(None)
            await call.write(session_start(f"bench-{index}"))
            await read(call)
            for request in audio_requests(np.concatenate([tone(440, 2.0), silence(1.0)])):
                await call.write(request)
            frames = 0
            while frames < 15:
                message = await read(call)
                assert message is not None
                frames += message.HasField("audio_frame")
            # speech_start_ms = 60: the third 20 ms frame of new speech starts the turn.
            requests = audio_requests(tone(660, 0.06), 150)
            for request in requests[:-1]:
                await call.write(request)
            sent = time.monotonic()
            await call.write(requests[-1])
            for _ in range(100):
                message = await read(call)
                assert message is not None
                if message.HasField("clear"):
                    latencies_ms.append((time.monotonic() - sent) * 1000)
                    break
            call.cancel()
    print(f"barge-in: last speech frame written -> clear received, {sessions} sessions, ms:")
    print(
        f"  p50 {percentile(latencies_ms, 50):.2f}  p99 {percentile(latencies_ms, 99):.2f}  "
        f"max {max(latencies_ms):.2f}"
    )


class _EchoFrames:
    """A backend that only sends each caller frame back: what is left is the servicer."""

    sends_session_events = False
    session_defaults: Mapping[str, Any] | None = None

    def __init__(self, ctx: Any, settings: Any = None) -> None:
        self._outbox = ctx.outbox

    async def start(self) -> None:
        pass

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        self._outbox.put(inference_pb2.StreamSessionResponse(audio_frame=frame))

    async def on_data_channel(self, text: str) -> None:
        pass

    async def close(self) -> None:
        pass


async def servicer_cost(frames: int, sessions: int) -> None:
    """CPU per frame pair (caller frame in, one frame out) through the servicer, both ends of
    the gRPC stream in this process: StreamSession with one session, then StreamSessions
    with `sessions` sessions sending one frame each per round."""
    servicer = BridgeServicer(BridgeSettings(), backend_factory=_EchoFrames)
    frame = inference_pb2.AudioFrame(data=bytes(960))
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start("single"))
        await read(call)
        cpu = 0.0
        for i in range(frames + 50):
            if i == 50:
                cpu = time.process_time()
            await call.write(inference_pb2.StreamSessionRequest(audio_frame=frame))
            await read(call)
        single_us = (time.process_time() - cpu) / frames * 1e6
        await call.done_writing()

        batched = stub.StreamSessions(None)
        item = inference_pb2.SessionRequestItem
        ids = [f"b{i}" for i in range(sessions)]
        await batched.write(
            inference_pb2.StreamSessionsRequest(
                items=[item(session_id=sid, request=session_start(sid)) for sid in ids]
            )
        )
        audio = inference_pb2.StreamSessionRequest(audio_frame=frame)
        round_batch = inference_pb2.StreamSessionsRequest(
            items=[item(session_id=sid, request=audio) for sid in ids]
        )
        received = 0

        async def until(count: int) -> None:
            nonlocal received
            while received < count:
                message = await batched.read()
                assert isinstance(message, inference_pb2.StreamSessionsResponse), "stream ended"
                received += len(message.items)

        await until(sessions)  # every session_accepted
        rounds = max(1, frames // sessions)
        for i in range(rounds + 5):
            if i == 5:  # after 5 rounds of warm-up
                cpu = time.process_time()
            await batched.write(round_batch)
            await until(received + sessions)
        batched_us = (time.process_time() - cpu) / (rounds * sessions) * 1e6
        await batched.done_writing()
        await servicer.wait_idle()
    print("servicer CPU per frame pair, echo-only backend, both ends in this process:")
    print(f"  StreamSession, 1 session:              {single_us:7.1f} us")
    print(f"  StreamSessions, {sessions} sessions per batch: {batched_us:7.1f} us")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=20, help="barge-in repetitions")
    parser.add_argument("--frames", type=int, default=3000, help="servicer cost: frame pairs")
    args = parser.parse_args(argv)
    vad_cost()
    asyncio.run(servicer_cost(args.frames, 100))
    asyncio.run(pacing())
    asyncio.run(barge_in(args.sessions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
