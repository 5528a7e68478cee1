"""A Pipecat pipeline behind voiceedge, built from offline processors only: it answers each
caller turn with the turn's own audio, stops when the caller barges in, and hangs up when
asked on the data channel.

    ./bazelw run //services/bridge -- --backend pipecat \\
        --pipecat-factory examples.pipecat.echo_pipeline:create_pipeline

Pipeline: transport.input() -> VADProcessor(EnergyVADAnalyzer) -> EchoTurns -> transport.output().
Swap `EnergyVADAnalyzer()` for `pipecat.audio.vad.silero.SileroVADAnalyzer()` (its model ships
in the wheel) for real speech; the energy detector is here because test tones are not speech.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from services.bridge.pipecat_backend import PipecatSession, VoiceEdgeTransport

HANG_UP = "example.hang_up"  # a data-channel event asking the pipeline to end the call
TURN_DONE = "example.turn"  # what the pipeline tells the caller after each turn it hears
ENERGY_THRESHOLD = 1000  # RMS of s16 samples (about -30 dBFS) that counts as voice
MAX_TURN_S = 30  # longest turn kept for the echo (older audio dropped)
CHUNK_MS = 40  # size of the TTSAudioRawFrames the echo is sent in
# Audio kept from before the VAD's speech start (it starts after start_secs of voice).
PREROLL_MS = 300


class EnergyVADAnalyzer(VADAnalyzer):
    """Voice = 20 ms windows louder than ENERGY_THRESHOLD (no model, deterministic)."""

    def __init__(self, *, params: VADParams | None = None) -> None:
        super().__init__(params=params or VADParams(start_secs=0.1, stop_secs=0.6, min_volume=0))

    def num_frames_required(self) -> int:
        return self.sample_rate // 50

    def voice_confidence(self, buffer: bytes) -> float:
        samples = np.frombuffer(buffer, dtype="<i2").astype(np.float64)
        if len(samples) == 0:
            return 0.0
        return 1.0 if float(np.sqrt(np.mean(samples**2))) >= ENERGY_THRESHOLD else 0.0


class EchoTurns(FrameProcessor):
    """Keeps the caller's audio of a turn and plays it back as TTS audio when the turn ends;
    a new turn while the echo plays interrupts it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._turn: list[bytes] | None = None
        self._recent: list[bytes] = []  # the last PREROLL_MS of caller audio, in frames
        self._rate = 16000
        self._bot_speaking = False
        self._turns = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._rate = frame.sample_rate
            keep, frames = self._recent, PREROLL_MS
            if self._turn is not None:
                keep, frames = self._turn, MAX_TURN_S * 1000
            keep.append(frame.audio)
            _trim(keep, frames * frame.sample_rate // 1000 * 2)
            return  # caller audio stops here: the output is only the echo
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._turn, self._recent = self._recent, []
            if self._bot_speaking:
                await self.broadcast_interruption()  # type: ignore[no-untyped-call]
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._turn is not None:
            turn, self._turn = b"".join(self._turn), None
            await self._echo(turn)
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        elif isinstance(frame, InputTransportMessageFrame) and _is(frame.message, HANG_UP):
            await self.push_frame(EndWorkerFrame(reason="caller asked to hang up"))
            return
        await self.push_frame(frame, direction)

    async def _echo(self, audio: bytes) -> None:
        self._turns += 1
        context = f"echo-{self._turns}"
        turn_ms = len(audio) // 2 * 1000 // self._rate
        message = {"type": TURN_DONE, "turn": self._turns, "audio_ms": turn_ms}
        await self.push_frame(OutputTransportMessageUrgentFrame(message=message))
        await self.push_frame(TTSStartedFrame(context_id=context))
        chunk = self._rate * CHUNK_MS // 1000 * 2
        for start in range(0, len(audio), chunk):
            await self.push_frame(
                TTSAudioRawFrame(
                    audio[start : start + chunk],
                    sample_rate=self._rate,
                    num_channels=1,
                    context_id=context,
                )
            )
        await self.push_frame(TTSStoppedFrame(context_id=context))


def _trim(chunks: list[bytes], max_bytes: int) -> None:
    """Drops the oldest chunks beyond max_bytes in all."""
    total = sum(len(c) for c in chunks)
    while chunks and total - len(chunks[0]) >= max_bytes:
        total -= len(chunks.pop(0))


def _is(message: Any, kind: str) -> bool:
    return isinstance(message, dict) and message.get("type") == kind


def create_pipeline(transport: VoiceEdgeTransport, session: PipecatSession) -> Pipeline:
    """The pipeline factory (`--pipecat-factory examples.pipecat.echo_pipeline:create_pipeline`)."""
    return Pipeline(
        [
            transport.input(),
            VADProcessor(vad_analyzer=EnergyVADAnalyzer()),
            EchoTurns(name=f"EchoTurns#{session.session_id}"),
            transport.output(),
        ]
    )
