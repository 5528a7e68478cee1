"""Every server event voiceedge sends on the data channel, made by the real code: the echo
agent (services/bridge/echo.py) driven with audio and client events, its messages turned
into events by the transceiver's protocol (services/transceiver/realtime_events.py), in
the order a caller sees them. Ids are deterministic (`event_golden<n>`).

`./bazelw run //tests/events:regenerate > tests/events/server_events.jsonl` rewrites the golden file
(golden_test.py fails when it differs from what the code makes now, and checks every line
against the OpenAI SDKs' own event schemas).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np

from services.bridge.backend import SessionContext
from services.bridge.echo import EchoAgent
from services.bridge.session import Outbox
from services.bridge.settings import BridgeSettings
from services.transceiver.realtime_events import (
    ENDINGS,
    STOPPED_AFTER_IDLE_TICKS,
    RealtimeEvents,
    event_ids,
)
from voiceedge.inference.v1 import inference_pb2

RATE = 24000
FRAME = RATE // 50
R = inference_pb2.StreamSessionResponse


def _tone(seconds: float) -> np.ndarray[Any, Any]:
    t = np.arange(int(RATE * seconds)) / RATE
    return (np.sin(2 * np.pi * 440.0 * t) * 0.3 * 32767).astype(np.int16)


class _Script:
    """The agent and the protocol, wired as Session wires them, minus the network."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.queued = 0  # response frames in the transceiver's playout (not played yet)
        self.outbox = Outbox("golden")
        settings = BridgeSettings(
            sample_rate_hz=RATE,
            vad_aggressiveness=3,
            end_of_turn_silence_ms=400,
            short_utterance_extra_silence_ms=0,
            prefix_padding_ms=300,
            max_utterance_s=30.0,
            playout_lead_ms=200,
        )
        self.agent = EchoAgent(SessionContext("golden", RATE, 1, {}, self.outbox), settings)
        self.events = RealtimeEvents(
            "golden", {"type": "realtime", "instructions": "say it back"}, event_ids("golden")
        )

    async def client(self, event: dict[str, Any] | str) -> None:
        text = event if isinstance(event, str) else json.dumps(event)
        outcome = self.events.from_client(text)
        self.out += [*outcome.broadcast, *outcome.reply]
        if outcome.to_bridge is not None:
            await self.agent.on_data_channel(outcome.to_bridge)

    async def speak(self, seconds: float, pause_s: float) -> None:
        audio = np.concatenate([_tone(seconds), np.zeros(int(RATE * pause_s), dtype=np.int16)])
        for offset in range(0, len(audio), FRAME):
            await self.agent.on_audio(
                inference_pb2.AudioFrame(data=audio[offset : offset + FRAME].tobytes())
            )

    async def until(self, kind: str) -> None:
        """Bridge messages into events (audio into playout ticks) until one of `kind`."""
        async with asyncio.timeout(20):
            while True:
                message = await self.outbox.get()
                assert message is not None
                payload = message.WhichOneof("payload")
                if payload == "audio_frame":
                    self.queued += 1
                    tick = self.events.playout(True)
                    self.out += [tick] if tick is not None else []
                elif payload == "clear":
                    self.out += self.events.cleared_by_bridge(self.queued)
                    self.queued = 0
                else:
                    self.out += self.events.from_bridge(message)
                text = (
                    message.data_channel_message.json if payload == "data_channel_message" else ""
                )
                if payload == kind or (text and json.loads(text)["type"] == kind):
                    return

    def drained(self) -> None:
        """The caller's playout ran dry."""
        self.queued = 0
        for _ in range(STOPPED_AFTER_IDLE_TICKS):
            tick = self.events.playout(False)
            self.out += [tick] if tick is not None else []


async def generate() -> list[str]:
    script = _Script()
    await script.agent.start()
    try:
        script.out += script.events.accepted(False, script.agent.session_defaults)
        silence_500 = {"type": "server_vad", "silence_duration_ms": 500}
        await script.client(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": silence_500}}},
            }
        )
        # A turn and its answer, played to the end.
        await script.speak(1.0, 0.8)
        await script.until("response_done")
        script.drained()
        # Another answer, cut off by the caller speaking over it (barge-in).
        await script.speak(1.0, 0.8)
        await script.until("audio_frame")
        await script.speak(1.0, 0.8)
        await script.until("response_done")  # the cancelled one
        await script.until("response_done")  # the answer to the interruption
        script.drained()
        # Another answer, cut off by the client (as the Agents SDK's interrupt() does).
        await script.speak(1.0, 0.8)
        await script.until("audio_frame")
        await script.client({"type": "response.cancel"})
        await script.client({"type": "output_audio_buffer.clear"})
        script.queued = 0
        await script.until("response_done")
        # Push-to-talk.
        await script.client(
            {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}
        )
        await script.client({"type": "input_audio_buffer.commit"})
        await script.until("error")
        await script.speak(0.5, 0.0)
        await script.client({"type": "input_audio_buffer.commit"})
        await script.until("input_audio_buffer.committed")
        await script.speak(0.3, 0.0)
        await script.client({"type": "input_audio_buffer.clear"})
        await script.until("input_audio_buffer.cleared")
        await script.client({"type": "response.create"})
        await script.until("response_done")
        script.drained()
        # Transcripts, as a realtime backend sends them (the echo agent has none).
        for item, source in (
            ("item_echo_1", inference_pb2.TRANSCRIPT_SOURCE_INPUT),
            ("item_out_1", inference_pb2.TRANSCRIPT_SOURCE_OUTPUT),
        ):
            for delta in (
                inference_pb2.TranscriptDelta(item_id=item, delta="hel", source=source),
                inference_pb2.TranscriptDelta(item_id=item, delta="lo", final=True, source=source),
            ):
                script.out += script.events.from_bridge(R(transcript_delta=delta))
        # What a malformed client event gets back.
        await script.client("{not json")
        # The last event of each session the server ends (drain, bridge lost, internal).
        script.out += [e for r in ENDINGS if (e := script.events.ending(r)) is not None]
    finally:
        await script.agent.close()
    return script.out


def main() -> int:
    for line in asyncio.run(generate()):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
