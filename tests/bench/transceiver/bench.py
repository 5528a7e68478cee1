"""Transceiver benchmark: prints figures, asserts nothing.

Part 1, media path per 20 ms frame, one core, no network: the stock aiortc audio path
(aiortc's Opus decoder and encoder at 48 kHz stereo, its pure-Python audio level) against
ours (libopus straight from/to 24 kHz mono, numpy-free hot path,
protobuf framing), transcoding and Opus passthrough. Prints CPU per frame pair (one frame
each way) and the sessions one core could carry at that cost.

Part 2, end to end: N aiortc echo sessions through a framing relay to a real transceiver
process pinned to core 0 (clients, relay and echo bridge run in this process on the other
core). Prints the transceiver's CPU per session and the fraction of caller frames that
reached the bridge more than 60 ms late.

Run: ./bazelw run //tests/bench/transceiver:bench -- --sessions 10 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import av
import grpc.aio
import numpy as np
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame

from libs.service.testing import binary, read_ready_line
from services.transceiver import aiortc_compat
from services.transceiver.bridge import BatchedBridge, BatchedLink
from services.transceiver.media import OpusPacketizer, OpusToPcm
from services.transceiver.transceiver_testing import (
    Client,
    EchoBridge,
    FramingRelay,
    create_request,
)
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2_grpc

RATE = 24000
FRAME_S = 0.02
LATE_S = 0.06


def tone_frame(rate: int, index: int) -> av.AudioFrame:
    samples = rate // 50
    t = (np.arange(samples) + index * samples) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440.0 * t)).astype(np.int16)
    frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
    frame.planes[0].update(pcm.tobytes())
    frame.sample_rate = rate
    frame.pts = index * samples
    frame.time_base = fractions.Fraction(1, rate)
    return frame


def per_frame_us(step: Callable[[int], None], frames: int) -> float:
    for i in range(20):
        step(i)
    start = time.process_time()
    for i in range(frames):
        step(i)
    return (time.process_time() - start) / frames * 1e6


def media_path(frames: int) -> None:
    level = aiortc_compat.audio_level_dbov
    stock_level = __import__("aiortc.rtp", fromlist=["x"]).compute_audio_level_dbov
    if stock_level is level:
        raise SystemExit("media_path must run before install_fast_audio_level")
    packets = [bytes(p) for p in _encode_tone(frames + 20)]

    # Stock aiortc echo server, per frame pair: aiortc decodes the caller's packet to 48 kHz
    # stereo, and sending it back costs the pure-Python audio level plus aiortc's encoder.
    stock_encoder, stock_decoder = OpusEncoder(), OpusDecoder()
    replies = [tone_frame(RATE, i) for i in range(frames + 20)]

    def stock(i: int) -> None:
        for frame in stock_decoder.decode(JitterFrame(packets[i], i * 960)):
            stock_level(frame)
            stock_encoder.encode(frame)

    decoded = stock_decoder.decode(JitterFrame(packets[0], 0))[0]

    # Ours, transcoding: decode on the loop to 24 kHz PCM, protobuf both ways, encode the
    # bridge's PCM with our own libopus encoder (no resample to stereo, no audio level).
    decoder, encoder = OpusToPcm(RATE), OpusPacketizer(RATE)
    pcm = [bytes(f.planes[0])[: 2 * f.samples] for f in replies]

    def ours(i: int) -> None:
        for chunk in decoder.push(packets[i]):
            inference_pb2.StreamSessionRequest(
                audio_frame=inference_pb2.AudioFrame(data=chunk, sequence=i)
            ).SerializeToString()
        reply = inference_pb2.StreamSessionResponse.FromString(
            inference_pb2.StreamSessionResponse(
                audio_frame=inference_pb2.AudioFrame(data=pcm[i])
            ).SerializeToString()
        )
        encoder.encode(reply.audio_frame.data)

    def passthrough(i: int) -> None:
        inference_pb2.StreamSessionRequest(
            audio_frame=inference_pb2.AudioFrame(data=packets[i], sequence=i)
        ).SerializeToString()
        inference_pb2.StreamSessionResponse.FromString(
            inference_pb2.StreamSessionResponse(
                audio_frame=inference_pb2.AudioFrame(data=packets[i])
            ).SerializeToString()
        )

    print(f"media path, CPU per 20 ms frame pair, {frames} frames, 1 core:")
    print(f"  {'path':38} {'us/frame':>9} {'sessions/core':>14}")
    for name, step in [
        ("stock aiortc echo (decode+level+encode)", stock),
        ("aiortc audio level, 48k stereo frame", lambda i: stock_level(decoded)),
        ("numpy audio level, same frame", lambda i: level(decoded)),
        ("ours, transcoding 24 kHz", ours),
        ("ours, Opus passthrough", passthrough),
    ]:
        cost = per_frame_us(step, frames)
        print(f"  {name:38} {cost:9.1f} {FRAME_S * 1e6 / cost:14.0f}")


async def grpc_echo(frames: int) -> None:
    """grpc.aio cost of one bridge frame pair: the transceiver writes an AudioFrame and reads
    the echo; both ends run in this process, so the figure covers both sides of the stream."""
    bridge = EchoBridge()
    await bridge.start()
    channel = grpc.aio.insecure_channel(bridge.address)
    stub: Any = inference_pb2_grpc.InferenceBridgeServiceStub(channel)  # aio, typed as sync
    call = stub.StreamSession()
    start_msg = inference_pb2.SessionStart(session_id="bench")
    await call.write(inference_pb2.StreamSessionRequest(session_start=start_msg))
    await call.read()
    frame = inference_pb2.AudioFrame(data=bytes(960))
    cpu = 0.0
    for i in range(frames + 50):
        if i == 50:
            cpu = time.process_time()
        await call.write(inference_pb2.StreamSessionRequest(audio_frame=frame))
        await call.read()
    used = (time.process_time() - cpu) / frames * 1e6
    await call.done_writing()
    await channel.close(None)
    await bridge.stop()
    print(
        f"  {'grpc.aio bridge frame pair (both ends)':38} {used:9.1f} "
        f"{FRAME_S * 1e6 / (used / 2):14.0f}  (transceiver side ~half)"
    )


async def grpc_echo_batched(frames: int, sessions: int = 100) -> None:
    """The same frame pair on StreamSessions: `sessions` sessions each send one AudioFrame
    per round through the transceiver's BatchedBridge and wait for every echo; both ends in
    this process."""
    bridge = EchoBridge()
    await bridge.start()
    channel = grpc.aio.insecure_channel(bridge.address)
    batched = BatchedBridge(channel, bridge.address)
    links = [BatchedLink(batched, f"b{i}") for i in range(sessions)]
    for link in links:
        await link.open(inference_pb2.SessionStart(session_id=link.session_id), 10)
    received = 0
    want = 0
    round_done = asyncio.Event()

    def on_message(message: inference_pb2.StreamSessionResponse) -> None:
        nonlocal received
        received += 1
        if received >= want:
            round_done.set()

    readers = [asyncio.create_task(link.read_loop(on_message)) for link in links]
    data = bytes(960)
    rounds = max(1, frames // sessions)
    cpu = 0.0
    for i in range(rounds + 5):
        if i == 5:
            cpu = time.process_time()
        want = received + sessions
        round_done.clear()
        for link in links:
            link.send_audio(data, 480)
        await round_done.wait()
    used = (time.process_time() - cpu) / (rounds * sessions) * 1e6
    for link in links:
        await link.close(0, "", notify=True)
    await asyncio.gather(*readers, return_exceptions=True)
    await batched.close()
    await channel.close(None)
    await bridge.stop()
    label = f"grpc.aio batched, {sessions} sessions"
    print(f"  {label:38} {used:9.1f} {FRAME_S * 1e6 / (used / 2):14.0f}  (transceiver side ~half)")


def _encode_tone(frames: int) -> list[bytes]:
    encoder = OpusEncoder()
    out: list[bytes] = []
    i = 0
    while len(out) < frames:
        payloads, _ = encoder.encode(tone_frame(48000, i))
        out += payloads
        i += 1
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def late_fraction(arrivals: Sequence[tuple[int, float]]) -> tuple[int, int]:
    """Frames later than LATE_S against the best-aligned 20 ms clock of their sequence."""
    if len(arrivals) < 2:
        return 0, len(arrivals)
    base = min(t - seq * FRAME_S for seq, t in arrivals)
    late = sum(1 for seq, t in arrivals if t - (base + seq * FRAME_S) > LATE_S)
    return late, len(arrivals)


def pinned(core: int) -> list[str]:
    """`taskset` to run a command on `core`, when the machine has more than one."""
    return ["taskset", "-c", str(core)] if (os.cpu_count() or 1) > 1 else []


def start_transceiver(
    bridge_address: str, profile: str, extra_args: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """The transceiver under test, pinned to core 0 when there is more than one;
    `extra_args` (settings flags) go after the benchmark's own."""
    command = binary("services/transceiver")
    if profile:
        command = [*binary("tests/bench/transceiver", "profiled_transceiver"), profile]
    return subprocess.Popen(
        [
            *pinned(0),
            *command,
            "--grpc-listen",
            "127.0.0.1:0",
            "--media-listen",
            "127.0.0.1:0",
            "--bridge-address",
            bridge_address,
            "--max-sessions",
            "10000",
            "--drain-grace-s",
            "1",
            "--log-level",
            "WARNING",
            *extra_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def end_to_end(sessions: int, seconds: float, passthrough: bool, profile: str) -> None:
    bridge = EchoBridge()
    bridge.record_arrivals = True
    await bridge.start()
    process = start_transceiver(bridge.address, profile)
    clients: list[Client] = []
    relay: FramingRelay | None = None
    try:
        ready = read_ready_line(process, 60)
        host, port = ready["media"].rsplit(":", 1)
        relay = await FramingRelay.start((host, int(port)))
        channel = grpc.aio.insecure_channel(ready["grpc"])
        stub = transceiver_pb2_grpc.TransceiverServiceStub(channel)
        idle_rss = rss_kib(process.pid)
        clients = [Client() for _ in range(sessions)]
        for i, client in enumerate(clients):
            request = create_request(
                f"b{i}", await client.offer(), relay.address, opus_passthrough=passthrough
            )
            response = await stub.CreateSession(request, timeout=30)
            await client.accept(response.answer_sdp)
        async with asyncio.timeout(60):
            await asyncio.gather(*(c.got_audio.wait() for c in clients))
        for stream in bridge.streams.values():
            stream.arrivals.clear()
        cpu0, wall0 = cpu_seconds(process.pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu = cpu_seconds(process.pid) - cpu0
        wall = time.monotonic() - wall0
        late = total = 0
        for stream in bridge.streams.values():
            lt, n = late_fraction(stream.arrivals)
            late += lt
            total += n
        rss = rss_kib(process.pid)
        mode = "Opus passthrough" if passthrough else "transcoding 24 kHz"
        per_frame_ms = cpu / wall * 20.0 / sessions
        print(
            f"end to end, {mode}: {sessions} sessions, {wall:.1f} s: transceiver CPU "
            f"{cpu / wall * 100:.0f}% of a core = {per_frame_ms:.3f} ms per session per 20 ms "
            f"(~{20.0 / per_frame_ms:.0f} sessions/core at this cost); frames >60 ms late at "
            f"the bridge {late}/{total} ({100.0 * late / max(total, 1):.2f}%); RSS "
            f"{(rss - idle_rss) / sessions:.0f} KiB per session"
        )
        await channel.close(None)
    finally:
        for client in clients:
            await client.close()
        if relay is not None:
            await relay.close()
        process.terminate()
        process.wait(timeout=60)
        await bridge.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--profile", default="", help="write cProfile stats of the transceiver to PATH.{mode}"
    )
    args = parser.parse_args(argv)
    media_path(args.frames)
    asyncio.run(grpc_echo(args.frames))
    asyncio.run(grpc_echo_batched(args.frames))
    sys.stdout.flush()
    if not args.skip_e2e:
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
        aiortc_compat.install_fast_audio_level()
        for passthrough in (False, True):
            profile = f"{args.profile}.{'passthrough' if passthrough else 'pcm'}"
            asyncio.run(
                end_to_end(
                    args.sessions, args.seconds, passthrough, profile if args.profile else ""
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
