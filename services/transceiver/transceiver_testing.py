"""Test stand-ins for the transceiver's neighbours, all real sockets on 127.0.0.1:
a framing UDP relay, an echoing inference bridge, an aiortc client, and the transceiver
itself in-process behind a real gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import av
import grpc
import grpc.aio
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from libs.service.aio import cancel_and_wait
from libs.service.runtime import GrpcService, Servicer
from libs.wire import framing, ufrag
from libs.wire.batches import ResponseBatches, session_requests
from libs.wire.classify import is_rtp
from libs.wire.framing import Address
from services.transceiver import aiortc_compat, opus
from services.transceiver.manager import SessionManager
from services.transceiver.media import OPUS_TIME_BASE, OpusPacketizer
from services.transceiver.servicer import TransceiverServicer
from services.transceiver.session import Session
from services.transceiver.settings import TransceiverSettings
from services.transceiver.udpmux import UdpMux
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc


class FramingRelay(asyncio.DatagramProtocol):
    """The relay, reduced to its wire contract: client datagrams in on `address`, framed to
    the transceiver; framed replies unwrapped and sent to the client they name."""

    def __init__(self, upstream: Address) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None
        self.address: Address = ("", 0)
        self.forwarded = 0
        self.returned = 0
        self.drop_rtp_every = 0  # > 0: every Nth client RTP datagram is lost on the way in
        self.dropped_rtp = 0
        # > 0: every Nth client RTP datagram is held back and sent after the next one (an
        # adjacent swap, as jitter makes them); with drop_rtp_every, the phases differ.
        self.swap_rtp_every = 0
        self.swapped_rtp = 0
        self._held: bytes | None = None
        self._rtp_seen = 0
        self.blackhole = False  # True: the client has vanished; nothing passes either way
        self.closed = asyncio.Event()

    @classmethod
    async def start(cls, upstream: Address, port: int = 0) -> FramingRelay:
        relay = cls(upstream)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: relay, local_addr=("127.0.0.1", port)
        )
        host, bound = transport.get_extra_info("sockname")[:2]
        relay.address = (host, bound)
        return relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self.transport is not None
        if self.blackhole:
            return
        if (addr[0], addr[1]) == self.upstream:
            ip, port, payload = framing.decode(data)
            self.returned += 1
            self.transport.sendto(payload, (ip, port))
        else:
            framed = framing.encode(addr[0], addr[1], data)
            if (self.drop_rtp_every or self.swap_rtp_every) and is_rtp(data):
                self._rtp_seen += 1
                if self.drop_rtp_every and self._rtp_seen % self.drop_rtp_every == 0:
                    self.dropped_rtp += 1
                    return
                if self.swap_rtp_every and self._rtp_seen % self.swap_rtp_every == 3:
                    self._held = framed
                    return
            self.forwarded += 1
            self.transport.sendto(framed, self.upstream)
            held, self._held = self._held, None
            if held is not None:
                self.swapped_rtp += 1
                self.forwarded += 1
                self.transport.sendto(held, self.upstream)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    async def close(self) -> None:
        """Closes the socket and waits until the port is free again."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None
            await self.closed.wait()


Resp = inference_pb2.StreamSessionResponse


@dataclass
class BridgeStream:
    session_id: str
    inject: asyncio.Queue[Resp | None] = field(default_factory=asyncio.Queue)
    audio_in: int = 0
    events_in: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once SessionAccepted is written: injected messages never overtake it.
    accepted_sent: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: int = 0
    ends: int = 0  # SessionEnd messages received (a session ends once)
    passthrough: bool = False
    input_format: common_pb2.AudioFormat | None = None
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (sequence, monotonic)
    reports: asyncio.Queue[inference_pb2.PlayoutReport] = field(default_factory=asyncio.Queue)
    frames: list[inference_pb2.AudioFrame] = field(default_factory=list)  # with arrivals


# A batch for the StreamSessions writer (None: a marker only) and the streams whose
# SessionAccepted has been written once it is.
_Answer = tuple[inference_pb2.StreamSessionsResponse | None, list[BridgeStream]]


class EchoBridge(inference_pb2_grpc.InferenceBridgeServiceServicer):
    """Accepts every session at 24 kHz (Opus passthrough when offered) and echoes caller
    audio and data-channel events back (unless `echo` / `echo_events` are off); tests push
    more through a stream's `inject`."""

    def __init__(self) -> None:
        self.streams: dict[str, BridgeStream] = {}
        self.echo = True
        self.echo_events = True
        self.batching = True  # False: StreamSessions answers UNIMPLEMENTED
        self.record_arrivals = False
        # > 0: SessionAccepted waits this long (a bridge or model still connecting)
        self.accept_delay_s = 0.0
        self.opened = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self, port: int = 0) -> None:
        """Serves on 127.0.0.1:`port` (0: any free; a restarted bridge takes its old one)."""
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def _accept(self, start: inference_pb2.SessionStart) -> tuple[BridgeStream, Resp]:
        """Records a new session; its SessionAccepted (24 kHz PCM, passthrough if offered)."""
        stream = BridgeStream(start.session_id)
        stream.passthrough = start.opus_passthrough
        stream.input_format = start.input_format
        self.streams[start.session_id] = stream
        fmt = common_pb2.AudioFormat(
            encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=24000, channels=1
        )
        accepted = inference_pb2.SessionAccepted(
            output_format=fmt, opus_passthrough=start.opus_passthrough
        )
        return stream, Resp(session_accepted=accepted)

    def _answer(
        self, stream: BridgeStream, request: inference_pb2.StreamSessionRequest
    ) -> Resp | None:
        """Records one caller message of an open session; the echo to send, if any."""
        kind = request.WhichOneof("payload")
        if kind == "audio_frame":
            stream.audio_in += 1
            if self.record_arrivals:
                stream.arrivals.append((request.audio_frame.sequence, time.monotonic()))
                stream.frames.append(request.audio_frame)
            return Resp(audio_frame=request.audio_frame) if self.echo else None
        if kind == "data_channel_message":
            stream.events_in.append(request.data_channel_message.json)
            if self.echo_events:
                return Resp(data_channel_message=request.data_channel_message)
        elif kind == "playout_report":
            stream.reports.put_nowait(request.playout_report)
        elif kind == "session_end":
            stream.end_reason = request.session_end.reason
            stream.ends += 1
        return None

    async def StreamSession(  # type: ignore[override]  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        first = await context.read()
        assert isinstance(first, inference_pb2.StreamSessionRequest)
        stream, accepted = self._accept(first.session_start)
        lock = asyncio.Lock()

        async def write(message: Resp) -> None:
            async with lock:
                await context.write(message)

        if self.accept_delay_s:
            await asyncio.sleep(self.accept_delay_s)  # the behaviour under test: a slow bridge
        await write(accepted)
        stream.accepted_sent.set()
        self.opened.set()

        async def pump_injected() -> None:
            while (item := await stream.inject.get()) is not None:
                await write(item)
                if item.WhichOneof("payload") == "session_end":
                    return

        injector = asyncio.create_task(pump_injected())
        try:
            while True:
                request = await context.read()
                if not isinstance(request, inference_pb2.StreamSessionRequest):  # grpc.aio.EOF
                    break
                answer = self._answer(stream, request)
                if answer is not None:
                    await write(answer)
                if request.WhichOneof("payload") == "session_end" or injector.done():
                    break
        finally:
            stream.ended.set()
            await cancel_and_wait(injector)

    async def StreamSessions(  # type: ignore[override]  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamSessionsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """The same echo on the batched stream: one response batch per request batch,
        written by a task of its own so that reading (and the arrival times recorded) never
        waits for a write to drain."""
        if not self.batching:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StreamSessions disabled")
        lock = asyncio.Lock()
        injectors: dict[str, asyncio.Task[None]] = {}

        async def write(batch: inference_pb2.StreamSessionsResponse) -> None:
            async with lock:
                await context.write(batch)

        async def pump_injected(stream: BridgeStream) -> None:
            await stream.accepted_sent.wait()
            injected = ResponseBatches()
            while (item := await stream.inject.get()) is not None:
                injected.add(stream.session_id, item)
                while (batch := injected.take()) is not None:
                    await write(batch)
                if item.WhichOneof("payload") == "session_end":
                    stream.ended.set()
                    return

        # Answer batches, each with the streams whose SessionAccepted it carries.
        outbox: asyncio.Queue[_Answer | None] = asyncio.Queue()

        async def pump_answers() -> None:
            while (ready := await outbox.get()) is not None:
                batch, accepted = ready
                if batch is not None:
                    await write(batch)
                for stream in accepted:
                    stream.accepted_sent.set()

        writer = asyncio.create_task(pump_answers())
        try:
            while True:
                batch = await context.read()
                if not isinstance(batch, inference_pb2.StreamSessionsRequest):  # grpc.aio.EOF
                    break
                answers = ResponseBatches()
                accepted_now: list[BridgeStream] = []
                for session_id, request in session_requests(batch):
                    kind = request.WhichOneof("payload")
                    response: Resp | None = None
                    if kind == "session_start":
                        started, response = self._accept(request.session_start)
                        injectors[session_id] = asyncio.create_task(pump_injected(started))
                        self.opened.set()
                        if self.accept_delay_s:  # a slow bridge: its answer comes later
                            late = ResponseBatches()
                            late.add(session_id, response)
                            asyncio.get_running_loop().call_later(
                                self.accept_delay_s, outbox.put_nowait, (late.take(), [started])
                            )
                            response = None
                        else:
                            accepted_now.append(started)
                    elif (stream := self.streams.get(session_id)) is not None:
                        response = self._answer(stream, request)
                        if kind == "session_end":
                            stream.ended.set()
                            task = injectors.pop(session_id, None)
                            if task is not None:
                                task.cancel()
                    if response is not None:
                        answers.add(session_id, response)
                while (out := answers.take()) is not None:
                    outbox.put_nowait((out, []))
                if accepted_now:  # after every batch that carries their answers
                    outbox.put_nowait((None, accepted_now))
                if writer.done():  # the stream broke under the writer
                    break
        finally:
            outbox.put_nowait(None)
            with contextlib.suppress(Exception):  # TimeoutError: a write that never drained
                await asyncio.wait_for(writer, 5.0)
            for session_id, task in injectors.items():
                task.cancel()
                self.streams[session_id].ended.set()
            await asyncio.gather(*injectors.values(), return_exceptions=True)


class PacedTrack(MediaStreamTrack):
    """A track that yields one 20 ms frame on its own clock, `frames` of them (None: no end)."""

    kind = "audio"

    def __init__(self, frames: int | None) -> None:
        super().__init__()
        self.frames = frames
        self._count = 0
        self._start: float | None = None

    async def _next_index(self) -> int:
        """Waits for the next frame's time; its index. MediaStreamError after the last."""
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        if self.frames is not None and self._count >= self.frames:
            self.stop()
            raise MediaStreamError
        wait = self._start + self._count * 0.02 - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._count += 1
        return self._count - 1


class ToneTrack(PacedTrack):
    """A paced 48 kHz mono sine wave, 20 ms per frame."""

    def __init__(
        self, frequency_hz: float = 440.0, amplitude: float = 0.3, frames: int | None = None
    ) -> None:
        super().__init__(frames)
        self.frequency_hz = frequency_hz
        self.amplitude = amplitude

    async def recv(self) -> av.AudioFrame:
        index = await self._next_index()
        n = 960
        t = (np.arange(n) + index * n) / 48000.0
        samples = (self.amplitude * 32767 * np.sin(2 * math.pi * self.frequency_hz * t)).astype(
            np.int16
        )
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = 48000
        frame.pts = index * n
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


class OpusToneTrack(PacedTrack):
    """The same paced tone as ToneTrack, but as ready Opus packets (one second encoded once
    and repeated): aiortc's sender only packs them, so many clients fit in one process."""

    def __init__(
        self,
        frequency_hz: float = 440.0,
        frames: int | None = None,
        *,
        fec: bool = False,
        pause: tuple[int, int] | None = None,
    ) -> None:
        # fec: libopus' SILK speech mode with in-band FEC (LBRR) for 20 % loss; pause
        # (after, frames): after that many packets none for that many 20 ms, then on with
        # RTP timestamps of real time and no sequence gap (a caller's DTX).
        super().__init__(frames)
        self.pause = pause
        encoder = (
            opus.Encoder(48000, "voip", 32000, 5, inband_fec=True, packet_loss_percent=20)
            if fec
            else None
        )
        packetizer = OpusPacketizer(48000)
        self.packets: list[bytes] = []
        n = 960
        for count in range(50):  # one second: a whole number of 440 Hz periods
            t = (np.arange(n) + count * n) / 48000.0
            samples = (0.3 * 32767 * np.sin(2 * math.pi * frequency_hz * t)).astype(np.int16)
            packet = (
                encoder.encode(samples.tobytes(), n)
                if encoder is not None
                else packetizer.encode(samples.tobytes())
            )
            assert packet is not None
            self.packets.append(packet)

    async def recv(self) -> av.Packet[Any]:
        index = await self._next_index()
        if self.pause is not None and index == self.pause[0]:
            for _ in range(self.pause[1]):
                index = await self._next_index()
        skipped = self.pause[1] if self.pause is not None and index > self.pause[0] else 0
        packet = av.Packet(self.packets[(index - skipped) % len(self.packets)])
        packet.pts = index * 960
        packet.time_base = OPUS_TIME_BASE
        return packet


def mono(frame: av.AudioFrame) -> np.ndarray[Any, np.dtype[np.int16]]:
    data = np.frombuffer(bytes(frame.planes[0]), dtype=np.int16)
    channels = len(frame.layout.channels)
    data = data[: frame.samples * channels]
    return data.reshape(-1, channels)[:, 0] if channels > 1 else data


def peak_frequency(samples: np.ndarray[Any, Any], rate_hz: int) -> float:
    window = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(window))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate_hz / len(samples))


def rms(samples: np.ndarray[Any, Any]) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


class Client:
    """An aiortc caller with a tone track and the 'oai-events' data channel."""

    def __init__(
        self,
        tone_hz: float = 440.0,
        tone_frames: int | None = None,
        decode_audio: bool = True,
        pre_encoded: bool = False,
        tone: MediaStreamTrack | None = None,
    ) -> None:
        # The tone track's frames go through aiortc's encoder, which measures each one's level.
        aiortc_compat.install_fast_audio_level()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.tone: MediaStreamTrack = tone or (
            OpusToneTrack(tone_hz, frames=tone_frames)
            if pre_encoded
            else ToneTrack(tone_hz, frames=tone_frames)
        )
        self.pc.addTrack(self.tone)
        self.packets_received = 0
        if not decode_audio:
            # Many clients in one process: count the server's Opus packets, decode none.
            (audio,) = self.pc.getTransceivers()
            aiortc_compat.tap_encoded_audio(audio.receiver, self._count_packet)
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: list[np.ndarray[Any, Any]] = []
        self.frame_rate = 48000
        self.got_audio = asyncio.Event()
        self.connected = asyncio.Event()
        self.ended = asyncio.Event()  # connectionState closed or failed
        self._tasks: list[asyncio.Task[None]] = []
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _count_packet(self, packet: bytes, timestamp: int) -> None:
        self.packets_received += 1

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()
        elif self.pc.connectionState in ("closed", "failed"):
            self.ended.set()

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.events.put_nowait(json.loads(message))

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._collect(track)))

    async def _collect(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            self.frame_rate = frame.sample_rate
            self.frames.append(mono(frame))
            if rms(self.frames[-1]) > 500:
                self.got_audio.set()

    async def offer(self) -> str:
        await aiortc_compat.add_loopback_host_candidate(self.pc)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    def restart_ice(self, server_ufrag: str, server_pwd: str) -> tuple[str, str]:
        """ICE restart from this side (aiortc has no restartIce): new credentials of our
        own, the server's new ones (what a PATCH answer carries); returns ours (what a
        PATCH sends)."""
        (transport,) = aiortc_compat.ice_transports(self.pc)
        ufrag, pwd = secrets.token_hex(4), secrets.token_hex(12)
        credentials = aiortc_compat.IceCredentials(ufrag, pwd, server_ufrag, server_pwd)
        aiortc_compat.restart_client_ice(aiortc_compat.connection_of(transport), credentials)
        return ufrag, pwd

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await aiortc_compat.wait_pc_closed(self.pc)


KEYRING = ufrag.dev_keyring()


def create_request(
    session_id: str, offer_sdp: str, relay: Address, **options: Any
) -> transceiver_pb2.CreateSessionRequest:
    minted = ufrag.mint(KEYRING, 1, 1)
    return transceiver_pb2.CreateSessionRequest(
        session_id=session_id,
        offer_sdp=offer_sdp,
        ice_ufrag=minted,
        ice_pwd=ufrag.password(minted, KEYRING),
        relay_endpoints=[common_pb2.SocketAddress(ip=relay[0], port=relay[1])],
        options=transceiver_pb2.SessionOptions(**options),
    )


@dataclass
class Stack:
    """The transceiver in-process (real gRPC server, real UDP mux), a relay and a bridge."""

    settings: TransceiverSettings
    mux: UdpMux
    manager: SessionManager
    grpc_service: GrpcService
    channel: grpc.aio.Channel
    stub: Any  # the generated stub on an aio channel (grpc-stubs type it as synchronous)
    relay: FramingRelay
    bridge: EchoBridge

    @classmethod
    async def start(cls, **settings: Any) -> Stack:
        bridge = EchoBridge()
        await bridge.start()
        values: dict[str, Any] = {
            "media_listen": "127.0.0.1:0",
            "grpc_listen": "127.0.0.1:0",
            "bridge_address": bridge.address,
            # Callers share this process and its loop: their load is not the transceiver's.
            "admission_max_loop_lag_ms": 0.0,
            "admission_max_cpu_percent": 0.0,
        }
        values.update(settings)
        config = TransceiverSettings(**values)
        config.validate()
        mux = UdpMux(control_first=config.mux_control_first)
        await mux.start("127.0.0.1", 0)
        manager = SessionManager(config, mux)
        servicer = TransceiverServicer(manager, config.drain_grace_s)
        name = transceiver_pb2.DESCRIPTOR.services_by_name["TransceiverService"].full_name
        service = GrpcService(
            "transceiver",
            "127.0.0.1:0",
            [
                Servicer(
                    name, transceiver_pb2_grpc.add_TransceiverServiceServicer_to_server, servicer
                )
            ],
        )
        await service.start()
        channel = grpc.aio.insecure_channel(service.address)
        relay = await FramingRelay.start(mux.address)
        return cls(
            config,
            mux,
            manager,
            service,
            channel,
            transceiver_pb2_grpc.TransceiverServiceStub(channel),
            relay,
            bridge,
        )

    async def connect(self, session_id: str, client: Client, **options: Any) -> None:
        request = create_request(session_id, await client.offer(), self.relay.address, **options)
        response = await self.stub.CreateSession(request, timeout=10)
        await client.accept(response.answer_sdp)

    async def stop(self) -> None:
        await self.manager.shutdown()
        await self.channel.close(None)
        await self.grpc_service.close()
        await self.relay.close()
        await self.bridge.stop()


async def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    """Polls a cheap in-memory condition every 10 ms, bounded in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def next_event(client: Client, kind: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The client's next data-channel event of type `kind` (earlier others are dropped)."""
    async with asyncio.timeout(timeout_s):
        while True:
            event = await client.events.get()
            if event.get("type") == kind:
                return event


async def closed_reason(stack: Stack, session_id: str, timeout_s: float = 10.0) -> int:
    session = stack.manager.find(session_id)
    if isinstance(session, Session):
        async with asyncio.timeout(timeout_s):
            await session.wait_closed()
    info = await stack.manager.find(session_id).info()
    assert info.state == transceiver_pb2.SESSION_STATE_CLOSED
    return int(info.stats.close_reason)
