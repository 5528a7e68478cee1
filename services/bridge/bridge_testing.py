"""Test helpers: a real gRPC bridge server on 127.0.0.1:0, a client stream, signals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import numpy as np

from libs.service.runtime import new_server
from services.bridge.servicer import BridgeServicer
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc

RATE = 24000
FRAME_SAMPLES = RATE // 50

Call = grpc.aio.StreamStreamCall[
    inference_pb2.StreamSessionRequest, inference_pb2.StreamSessionResponse
]


@contextlib.asynccontextmanager
async def serve(
    servicer: BridgeServicer,
) -> AsyncIterator[inference_pb2_grpc.InferenceBridgeServiceAsyncStub]:
    """Runs `servicer` on a real server on 127.0.0.1:0; yields a stub connected to it."""
    before = asyncio.all_tasks()
    server = new_server()
    inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield inference_pb2_grpc.InferenceBridgeServiceStub(channel)
    finally:
        await channel.close(None)
        await server.stop(None)
        # grpc.aio finishes cancelled and aborted RPC handlers in tasks of its own after
        # stop() returns; wait for them so no test leaves them running.
        current = asyncio.current_task()
        leftover = [t for t in asyncio.all_tasks() - before if t is not current]
        if leftover:
            await asyncio.wait(leftover, timeout=5)


def session_start(session_id: str = "sess-1", **fmt: int) -> inference_pb2.StreamSessionRequest:
    input_format = common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE,
        sample_rate_hz=RATE,
        channels=1,
        frame_duration_ms=20,
    )
    for name, value in fmt.items():
        setattr(input_format, name, value)
    return inference_pb2.StreamSessionRequest(
        session_start=inference_pb2.SessionStart(session_id=session_id, input_format=input_format)
    )


def tone(freq_hz: float, seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * freq_hz * t)).astype(np.int16)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def audio_requests(
    samples: np.ndarray, first_sequence: int = 0
) -> list[inference_pb2.StreamSessionRequest]:
    """20 ms AudioFrame requests of `samples`, numbered from first_sequence."""
    out = []
    for index, offset in enumerate(range(0, len(samples), FRAME_SAMPLES)):
        sequence = first_sequence + index
        out.append(
            inference_pb2.StreamSessionRequest(
                audio_frame=inference_pb2.AudioFrame(
                    data=samples[offset : offset + FRAME_SAMPLES].astype("<i2").tobytes(),
                    sequence=sequence,
                    timestamp_samples=sequence * FRAME_SAMPLES,
                )
            )
        )
    return out


async def read(call: Call) -> inference_pb2.StreamSessionResponse | None:
    """The next response, or None at the end of the stream."""
    message = await call.read()
    # Anything else is grpc.aio.EOF (missing from the type stubs).
    return message if isinstance(message, inference_pb2.StreamSessionResponse) else None


def dominant_hz(pcm: bytes, rate: int = RATE) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def read_until(
    call: Call, stop: str, limit: int = 3000
) -> list[inference_pb2.StreamSessionResponse]:
    """Responses up to and including the first whose payload is `stop` (bounded)."""
    out: list[inference_pb2.StreamSessionResponse] = []
    for _ in range(limit):
        message = await read(call)
        assert message is not None, [m.WhichOneof("payload") for m in out]
        out.append(message)
        if message.WhichOneof("payload") == stop:
            return out
    raise AssertionError(f"no {stop} in {limit} messages")
