"""A voiceedge call from Python with aiortc, through the public HTTP API only.

    ./bazelw run //examples/python_client -- --base-url http://127.0.0.1:8080 \
        --api-key "$VOICEEDGE_API_KEY" --seconds 6 --out reply.wav

It offers one audio track (a test tone, or a 16-bit WAV with --wav) and the `oai-events`
data channel, POSTs the offer to /v1/realtime/calls, prints the selected ICE pair and every
event, records what the agent says to --out, then hangs up with DELETE. The same
`run_call` coroutine drives the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import math
import sys
import time
import wave
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


class ToneTrack(MediaStreamTrack):
    """Mono audio, paced in real time: a sine at `frequency_hz`, or the samples given."""

    kind = "audio"

    def __init__(
        self, frequency_hz: float = 440.0, samples: np.ndarray | None = None, level: float = 0.3
    ) -> None:
        super().__init__()
        self._frequency = frequency_hz
        self._samples = samples
        self._level = level
        self._pts = 0
        self._start: float | None = None
        self.silent = False  # set True to send silence (pause the speaker)

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        target = self._start + self._pts / SAMPLE_RATE
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.silent:
            chunk = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        elif self._samples is not None:
            index = np.arange(self._pts, self._pts + FRAME_SAMPLES) % len(self._samples)
            chunk = self._samples[index]
        else:
            t = (np.arange(FRAME_SAMPLES) + self._pts) / SAMPLE_RATE
            wave_ = np.sin(2 * math.pi * self._frequency * t) * self._level * 32767
            chunk = wave_.astype(np.int16)
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._pts += FRAME_SAMPLES
        return frame


@dataclass
class CallResult:
    """What a call saw: status, answer, ICE pair, events, and the audio received."""

    status: int
    call_url: str = ""
    answer_sdp: str = ""
    error_body: str = ""
    connected: bool = False
    remote_candidate: tuple[str, int] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    received: list[np.ndarray] = field(default_factory=list)
    received_rate: int = SAMPLE_RATE
    # time.monotonic() of each received frame, and of the call's steps: "post", "answer"
    # (the 201 arrived), "connected" (for the netsim benchmark's set-up figures).
    arrivals: list[float] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    # The "oai-events" data channel, for a `during` that sends client events.
    channel: Any = field(default=None, repr=False)
    _new_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._new_event.set()

    def event_types(self) -> list[str]:
        return [str(e.get("type")) for e in self.events]

    async def wait_event(self, event_type: str, timeout_s: float) -> bool:
        """Waits until a data-channel event whose type contains `event_type` has arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not any(event_type in t for t in self.event_types()):
            self._new_event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._new_event.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def audio(self) -> np.ndarray:
        if not self.received:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self.received)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency in `samples` (Hann window, real FFT)."""
    if len(samples) < 256:
        return 0.0
    data = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(data))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * rate / len(samples))


async def _record(track: MediaStreamTrack, result: CallResult, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            frame = await asyncio.wait_for(track.recv(), timeout=1.0)
        except TimeoutError:
            continue
        except MediaStreamError:  # the remote track ended
            return
        if not isinstance(frame, AudioFrame):
            continue
        pcm = frame.to_ndarray()
        channels = len(frame.layout.channels)
        mono = pcm.reshape(-1, channels)[:, 0] if channels > 1 else pcm.reshape(-1)
        result.received_rate = frame.sample_rate
        result.received.append(mono.astype(np.int16))
        result.arrivals.append(time.monotonic())


async def run_call(
    base_url: str,
    api_key: str,
    *,
    track: MediaStreamTrack | None = None,
    seconds: float = 3.0,
    connect_timeout_s: float = 10.0,
    path: str = "/v1/realtime/calls",
    during: Any = None,
) -> CallResult:
    """Places one call and returns what it saw. `during(pc, result)` (a coroutine function)
    runs once connected, instead of just waiting `seconds`."""
    # No STUN server: the edge learns the caller's address from its checks through the relay
    # (peer-reflexive), and aiortc's default (a public STUN server) would send packets off
    # the machine in tests and wait for them offline.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    result = CallResult(status=0)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    connected = asyncio.Event()
    try:
        pc.addTrack(track or ToneTrack())
        channel = pc.createDataChannel("oai-events")
        result.channel = channel

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            try:
                result.add_event(json.loads(message))
            except (ValueError, TypeError):
                result.add_event({"type": "unparseable", "raw": str(message)})

        @pc.on("track")
        def on_track(remote: MediaStreamTrack) -> None:
            tasks.append(asyncio.ensure_future(_record(remote, result, stop)))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                connected.set()

        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/sdp"}
        async with aiohttp.ClientSession() as http:
            result.times["post"] = time.monotonic()
            async with http.post(
                base_url + path, data=pc.localDescription.sdp, headers=headers
            ) as response:
                result.status = response.status
                body = await response.text()
                if response.status != 201:
                    result.error_body = body
                    return result
                result.answer_sdp = body
                result.call_url = response.headers.get("Location", "")
                result.times["answer"] = time.monotonic()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            await asyncio.wait_for(connected.wait(), timeout=connect_timeout_s)
            result.times["connected"] = time.monotonic()
            result.connected = True
            pair = pc.sctp.transport.transport._connection._nominated  # type: ignore[union-attr]
            for candidate_pair in pair.values():
                remote = candidate_pair.remote_candidate
                result.remote_candidate = (remote.host, remote.port)
            if during is not None:
                await during(pc, result)
            else:
                await asyncio.sleep(seconds)
            if result.call_url:
                url = result.call_url
                if url.startswith("/"):
                    url = base_url + url
                async with http.delete(url, headers={"Authorization": f"Bearer {api_key}"}):
                    pass
        return result
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pc.close()


def talk_then_listen(
    track: ToneTrack, talk_s: float, seconds: float
) -> Callable[[RTCPeerConnection, CallResult], Awaitable[None]]:
    """A `during` for run_call: speak `talk_s`, then silence for the rest of `seconds`.

    A voice agent answers when the caller's turn ends, and a turn ends on silence: an endless
    tone is one turn that never ends, so the agent never speaks."""

    async def during(pc: RTCPeerConnection, result: CallResult) -> None:
        await asyncio.sleep(min(talk_s, seconds))
        track.silent = True
        await asyncio.sleep(max(seconds - talk_s, 0.0))

    return during


def _read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getframerate() != SAMPLE_RATE:
            raise SystemExit(f"{path}: need 16-bit PCM at {SAMPLE_RATE} Hz")
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
        return data.reshape(-1, wav.getnchannels())[:, 0].copy()


def _write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype(np.int16).tobytes())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", required=True, help="API key or ek_ client secret")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the call lasts")
    parser.add_argument(
        "--talk-seconds",
        type=float,
        default=1.0,
        help="speak this long, then send silence so the agent's turn ends and it answers",
    )
    parser.add_argument("--wav", help="16-bit 48 kHz WAV to send (default: a 440 Hz tone)")
    parser.add_argument("--out", help="write the received audio to this WAV file")
    args = parser.parse_args(argv)
    track = ToneTrack(samples=_read_wav(args.wav)) if args.wav else ToneTrack()
    result = asyncio.run(
        run_call(
            args.base_url,
            args.api_key,
            track=track,
            during=talk_then_listen(track, args.talk_seconds, args.seconds),
        )
    )
    if result.status != 201:
        print(f"call refused: HTTP {result.status} {result.error_body}", file=sys.stderr)
        return 1
    print(f"call {result.call_url}: connected={result.connected} via {result.remote_candidate}")
    for event in result.events:
        print(f"event {event.get('type')}")
    audio = result.audio()
    print(
        f"received {len(audio) / result.received_rate:.2f} s of audio, dominant "
        f"{dominant_frequency(audio, result.received_rate):.0f} Hz"
    )
    if args.out:
        _write_wav(args.out, audio, result.received_rate)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
