"""A call whose turns are timed from both ends: a real aiortc caller through the real
transceiver (in-process, real gRPC server and UDP mux, the test kit's framing relay) to the
real bridge with its echo agent (a real gRPC server on 127.0.0.1:0).

The caller speaks like a microphone: each 20 ms frame leaves when it has been captured
(at its end), so its own end of speech is the moment its last tone frame leaves. It then
sends silence, and times the first packet of the echo whose decoded audio has energy, as
that packet arrives (before aiortc's jitter buffer). The transceiver reports the same turn
from the end of speech the bridge detected (turn_timing.py). Used by turn_latency_test and
the `//tests/bench:turn_latency` benchmark.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from libs.service.runtime import new_server
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from services.transceiver import aiortc_compat, opus
from services.transceiver.call_metrics import CallRecord
from services.transceiver.media import OPUS_TIME_BASE, OpusPacketizer
from services.transceiver.session import Session
from services.transceiver.transceiver_testing import Stack, create_request
from services.transceiver.turn_timing import TurnLatency
from voiceedge.inference.v1 import inference_pb2_grpc

FRAME_S = 0.02
SAMPLES = 960  # 20 ms at 48 kHz
LEAD_FRAMES = 50  # silence before the first turn: the bridge accepts meanwhile
TONE_FRAMES = 40  # 0.8 s of 440 Hz per turn
GAP_FRAMES = 110  # 2.2 s of silence after it: end of turn, think time, the echo played
ENERGY_RMS = 1000.0  # a received frame louder than this is the echo (the tone: ~6900)
# The echo agent's turn taking for these calls: the whole utterance back (no prefix), and a
# short end-of-turn silence so a call is quick.
BRIDGE = BridgeSettings(
    grpc_listen="127.0.0.1:0",
    end_of_turn_silence_ms=400,
    short_utterance_extra_silence_ms=0,
    prefix_padding_ms=0,
)


def _turn_packets() -> tuple[list[bytes], list[bytes]]:
    """Opus packets of one turn's tone and of silence, encoded in one run (the tone's tail
    in the silence after it, as a live encoder gives it)."""
    encoder = OpusPacketizer(48000)
    silence = bytes(SAMPLES * 2)
    for _ in range(5):  # past the encoder's look-ahead
        encoder.encode(silence)
    tone: list[bytes] = []
    for index in range(TONE_FRAMES):
        t = (np.arange(SAMPLES) + index * SAMPLES) / 48000.0
        samples = (0.3 * 32767 * np.sin(2 * math.pi * 440.0 * t)).astype(np.int16)
        packet = encoder.encode(samples.tobytes())
        assert packet is not None
        tone.append(packet)
    quiet: list[bytes] = []
    for _ in range(GAP_FRAMES):
        packet = encoder.encode(silence)
        assert packet is not None
        quiet.append(packet)
    return tone, quiet


class MicTrack(MediaStreamTrack):
    """Pre-encoded Opus, one packet per 20 ms, each sent at the end of the 20 ms it holds.
    Lead silence, then `turns` times tone and silence; `speech_ends` gets the moment
    (loop time) each turn's last tone packet left."""

    kind = "audio"

    def __init__(self, turns: int) -> None:
        super().__init__()
        tone, quiet = _turn_packets()
        self._packets = quiet[:LEAD_FRAMES] + (tone + quiet) * turns
        period = TONE_FRAMES + GAP_FRAMES
        self._last_tone = {LEAD_FRAMES + k * period + TONE_FRAMES - 1 for k in range(turns)}
        self.speech_ends: list[float] = []
        self.done = asyncio.Event()
        self._count = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet[Any]:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        index = self._count
        if index >= len(self._packets):
            self.done.set()
            self.stop()
            raise MediaStreamError
        wait = self._start + (index + 1) * FRAME_S - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._count += 1
        if index in self._last_tone:
            self.speech_ends.append(loop.time())  # aiortc packs and sends it from here
        packet = av.Packet(self._packets[index])
        packet.pts = index * SAMPLES
        packet.time_base = OPUS_TIME_BASE
        return packet


class TurnCaller:
    """The aiortc caller: a MicTrack out, the echo timed in (`loud_arrivals`)."""

    def __init__(self, turns: int) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = MicTrack(turns)
        self.pc.addTrack(self.mic)
        (audio,) = self.pc.getTransceivers()
        self._decoder = opus.Decoder(48000)
        self.loud_arrivals: list[float] = []  # loop time of every loud packet received
        aiortc_compat.tap_rtp_arrivals(audio.receiver, self._arrived)
        self.channel = self.pc.createDataChannel("oai-events")
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)

    def _arrived(self, payload: bytes, timestamp: int) -> None:
        now = asyncio.get_running_loop().time()
        try:
            pcm = np.frombuffer(self._decoder.decode(payload), dtype=np.int16)
        except opus.OpusError:
            return
        if len(pcm) and float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) > ENERGY_RMS:
            self.loud_arrivals.append(now)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._drain(track)))

    async def _drain(self, track: MediaStreamTrack) -> None:
        """aiortc's decoded frames are not needed (the tap timed the packets): read and drop."""
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return

    def first_echoes(self) -> list[float | None]:
        """Per turn: the own end of speech to the first loud packet after it (seconds)."""
        out: list[float | None] = []
        for end in self.mic.speech_ends:
            later = [t for t in self.loud_arrivals if t > end]
            out.append(later[0] - end if later else None)
        return out

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await aiortc_compat.wait_pc_closed(self.pc)


@dataclasses.dataclass(frozen=True)
class TurnCallResult:
    measured_s: list[float | None]  # per turn, by the caller
    reported: list[TurnLatency]  # per turn, by the transceiver
    record: CallRecord | None  # the transceiver's call record


async def run_turn_call(think_ms: int, turns: int = 3, timeout_s: float = 60.0) -> TurnCallResult:
    """One call of `turns` turns with the echo agent thinking `think_ms` before each answer."""
    servicer = BridgeServicer(dataclasses.replace(BRIDGE, echo_think_ms=think_ms))
    server = new_server()
    inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stack = await Stack.start(bridge_address=f"127.0.0.1:{port}")
    caller = TurnCaller(turns)
    reported: list[TurnLatency] = []
    session: Session | None = None
    try:
        await aiortc_compat.add_loopback_host_candidate(caller.pc)
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        request = create_request("turns", caller.pc.localDescription.sdp, stack.relay.address)
        response = await stack.stub.CreateSession(request, timeout=10)
        found = stack.manager.find("turns")
        assert isinstance(found, Session)
        session = found
        metrics_hook = session.turns.on_turn

        def on_turn(turn: TurnLatency) -> None:
            reported.append(turn)
            if metrics_hook is not None:
                metrics_hook(turn)

        session.turns.on_turn = on_turn
        await caller.pc.setRemoteDescription(RTCSessionDescription(response.answer_sdp, "answer"))
        async with asyncio.timeout(timeout_s):
            await caller.mic.done.wait()  # the last echo has played by then
            for _ in range(100):  # and the transceiver has counted it (bounded: 5 s)
                if len(reported) >= turns:
                    break
                await asyncio.sleep(0.05)
    finally:
        await caller.close()
        if session is not None:
            async with asyncio.timeout(15):
                await session.wait_closed()
        await stack.stop()
        await server.stop(None)
    records = [r for r in stack.manager.call_records if r.session_id == "turns"]
    return TurnCallResult(caller.first_echoes(), reported, records[-1] if records else None)
