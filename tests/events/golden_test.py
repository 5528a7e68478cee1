"""The golden file of server events (server_events.jsonl) is what the code makes now, and
every line is an event OpenAI's Python SDK knows: its `RealtimeServerEvent` models
(pinned in requirements.lock) validate each one strictly. A renamed event, a missing
`event_id` or a missing required field fails here; //tests/events:sdk_parser_test runs the
Agents SDK's own parser on the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import pytest
from openai.types.realtime import RealtimeServerEvent

from tests.events.golden import generate

GOLDEN = Path(__file__).with_name("server_events.jsonl")
REGENERATE = "./bazelw run //tests/events:regenerate > tests/events/server_events.jsonl"


def _golden() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]


@pytest.mark.timeout_s(60)
async def test_the_golden_file_is_what_the_code_sends() -> None:
    made = [json.loads(line) for line in await generate()]
    assert made == _golden(), f"server events changed: regenerate with `{REGENERATE}`"


def test_the_golden_file_covers_every_event_voiceedge_emits() -> None:
    kinds = {event["type"] for event in _golden()}
    assert kinds >= {
        "session.created",
        "session.updated",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
        "response.created",
        "response.done",
        "output_audio_buffer.started",
        "output_audio_buffer.stopped",
        "output_audio_buffer.cleared",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
        "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done",
        "error",
    }


@pytest.mark.parametrize("event", _golden(), ids=lambda e: f"{e['event_id']}:{e['type']}")
def test_every_event_validates_against_the_openai_sdk_models(event: dict[str, Any]) -> None:
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeServerEvent)
    parsed = adapter.validate_python(event, strict=False)
    assert parsed.type == event["type"]
    assert isinstance(event["event_id"], str)
    assert event["event_id"].startswith("event_")


def test_event_ids_are_unique() -> None:
    ids = [event["event_id"] for event in _golden()]
    assert len(ids) == len(set(ids))
