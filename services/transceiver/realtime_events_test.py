"""The data-channel event protocol (realtime_events.py), as a table of inputs and the
events they must produce."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.transceiver.realtime_events import (
    ITEMS_REMEMBERED,
    STOPPED_AFTER_IDLE_TICKS,
    RealtimeEvents,
    event_ids,
)
from voiceedge.inference.v1 import inference_pb2

R = inference_pb2.StreamSessionResponse
SILENCE_700 = {"type": "server_vad", "silence_duration_ms": 700}


def events(texts: list[str]) -> list[dict[str, Any]]:
    return [json.loads(t) for t in texts]


def proto(session_config: dict[str, Any] | None = None, *, owns: bool = False) -> RealtimeEvents:
    p = RealtimeEvents("s1", session_config, event_ids("t"))
    p.accepted(owns, {"audio": {"input": {"turn_detection": SILENCE_700}}})
    return p


def test_event_ids_are_unique_and_prefixed() -> None:
    new_id = event_ids()
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("event_") for i in ids)
    assert event_ids()() != event_ids()()  # another session, another prefix


def test_session_created_merges_defaults_config_and_keeps_type() -> None:
    p = RealtimeEvents(
        "s1",
        {"type": "realtime", "instructions": "hi", "audio": {"input": {"format": {"rate": 24000}}}},
        event_ids("t"),
    )
    (created,) = events(p.accepted(False, {"audio": {"input": {"turn_detection": SILENCE_700}}}))
    assert created["type"] == "session.created"
    assert created["event_id"] == "event_t1"
    session = created["session"]
    assert session["type"] == "realtime"
    assert session["id"] == "sess_s1"
    assert session["instructions"] == "hi"
    assert session["audio"]["input"] == {"format": {"rate": 24000}, "turn_detection": SILENCE_700}


def test_a_bridge_that_sends_session_events_gets_no_synthesized_ones() -> None:
    p = RealtimeEvents("s1", None, event_ids("t"))
    assert p.accepted(True, None) == []
    outcome = p.from_client('{"type":"session.update","session":{"instructions":"x"}}')
    assert outcome.broadcast == ()
    assert outcome.to_bridge is not None
    # The model's own session.updated passes through, gains an event_id, and is what a new
    # sideband is told.
    (passed,) = events(
        p.from_bridge(
            R(
                data_channel_message=inference_pb2.DataChannelMessage(
                    json='{"type":"session.updated","session":{"type":"realtime","voice":"marin"}}'
                )
            )
        )
    )
    assert passed["event_id"].startswith("event_t")
    assert json.loads(p.session_created())["session"] == {"type": "realtime", "voice": "marin"}


@pytest.mark.parametrize(
    ("update", "silence"),
    [
        ({"audio": {"input": {"turn_detection": {"silence_duration_ms": 300}}}}, 300),
        ({"instructions": "only this"}, 700),  # other fields leave turn detection alone
    ],
)
def test_session_update_is_answered_with_the_merged_session(
    update: dict[str, Any], silence: int
) -> None:
    p = proto()
    outcome = p.from_client(json.dumps({"type": "session.update", "session": update}))
    (updated,) = events(list(outcome.broadcast))
    assert updated["type"] == "session.updated"
    detection = updated["session"]["audio"]["input"]["turn_detection"]
    assert detection["silence_duration_ms"] == silence
    assert detection["type"] == "server_vad"
    assert outcome.to_bridge is not None  # the bridge applies it
    assert json.loads(outcome.to_bridge)["session"] == update


def test_turn_detection_null_is_reported_as_null() -> None:
    p = proto()
    outcome = p.from_client(
        '{"type":"session.update","session":{"audio":{"input":{"turn_detection":null}}}}'
    )
    (updated,) = events(list(outcome.broadcast))
    assert updated["session"]["audio"]["input"]["turn_detection"] is None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_event"),
        ('{"type": 5}', "invalid_event"),
        ('{"type":"session.update","event_id":"c1"}', "invalid_value"),
        ('{"type":"session.update","session":{"type":"transcription"}}', "invalid_value"),
    ],
)
def test_bad_client_events_get_an_error_to_the_sender_only(text: str, code: str) -> None:
    outcome = proto().from_client(text)
    assert outcome.to_bridge is None
    assert outcome.broadcast == ()
    (error,) = events(list(outcome.reply))
    assert error["type"] == "error"
    assert error["error"]["code"] == code
    if '"event_id":"c1"' in text:
        assert error["error"]["event_id"] == "c1"


def test_output_audio_buffer_clear_clears_here_and_tells_the_bridge() -> None:
    p = proto()
    p.from_bridge(R(response_started=inference_pb2.ResponseStarted(response_id="resp_1")))
    assert p.playout(True) is not None
    outcome = p.from_client('{"type":"output_audio_buffer.clear"}')
    assert outcome.clear_playout
    assert outcome.to_bridge == '{"type":"output_audio_buffer.clear"}'
    (cleared,) = events(list(outcome.broadcast))
    assert cleared == {
        "type": "output_audio_buffer.cleared",
        "event_id": cleared["event_id"],
        "response_id": "resp_1",
    }
    # Cleared: the response's done does not produce a `stopped` later.
    p.from_bridge(R(response_done=inference_pb2.ResponseDone(response_id="resp_1")))
    assert p.playout(False) is None


@pytest.mark.parametrize(
    "kind",
    [
        "response.cancel",
        "response.create",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "conversation.item.create",
    ],
)
def test_other_client_events_go_to_the_bridge_as_sent(kind: str) -> None:
    text = json.dumps({"type": kind, "event_id": "c9"})
    outcome = proto().from_client(text)
    assert outcome.to_bridge == text
    assert (outcome.broadcast, outcome.reply, outcome.clear_playout) == ((), (), False)


def test_output_audio_buffer_started_and_stopped_follow_playout_and_response() -> None:
    p = proto()
    p.from_bridge(R(response_started=inference_pb2.ResponseStarted(response_id="resp_1")))
    assert p.playout(False) is None  # nothing played yet
    started = json.loads(p.playout(True) or "{}")
    assert started["type"] == "output_audio_buffer.started"
    assert started["response_id"] == "resp_1"
    assert p.playout(True) is None
    assert p.playout(False) is None  # a gap mid-response is not the end
    p.from_bridge(R(response_done=inference_pb2.ResponseDone(response_id="resp_1")))
    assert p.playout(True) is None  # queued audio still playing
    idle = [p.playout(False) for _ in range(STOPPED_AFTER_IDLE_TICKS)]
    assert idle[:-1] == [None] * (STOPPED_AFTER_IDLE_TICKS - 1)
    stopped = json.loads(idle[-1] or "{}")
    assert stopped["type"] == "output_audio_buffer.stopped"
    assert stopped["response_id"] == "resp_1"
    assert p.playout(False) is None


def test_audio_without_responses_does_not_flap_on_short_gaps() -> None:
    """A bridge that streams audio with no ResponseStarted/Done (an echo): one `started`,
    gaps shorter than the hold-off stay inside it, a long silence `stopped`."""
    p = proto()
    ticks = [True] * 10 + ([False] * (STOPPED_AFTER_IDLE_TICKS - 1) + [True] * 3) * 20
    ticks += [False] * STOPPED_AFTER_IDLE_TICKS
    kinds = [json.loads(e)["type"] for e in (p.playout(t) for t in ticks) if e is not None]
    assert kinds == ["output_audio_buffer.started", "output_audio_buffer.stopped"]


def test_transcripts_use_ga_names_and_carry_the_whole_text() -> None:
    p = proto()
    p.from_bridge(R(speech_started=inference_pb2.SpeechStarted(audio_start_ms=100, item_id="i1")))
    p.from_bridge(R(speech_stopped=inference_pb2.SpeechStopped(audio_end_ms=1600, item_id="i1")))
    src_in, src_out = inference_pb2.TRANSCRIPT_SOURCE_INPUT, inference_pb2.TRANSCRIPT_SOURCE_OUTPUT

    def delta(item: str, text: str, final: bool, source: int) -> dict[str, Any]:
        message = R(
            transcript_delta=inference_pb2.TranscriptDelta(
                item_id=item,
                delta=text,
                final=final,
                source=source,  # type: ignore[arg-type]
            )
        )
        (event,) = events(p.from_bridge(message))
        return event

    assert delta("i1", "hel", False, src_in)["type"] == (
        "conversation.item.input_audio_transcription.delta"
    )
    done = delta("i1", "lo", True, src_in)
    assert done["type"] == "conversation.item.input_audio_transcription.completed"
    assert (done["transcript"], done["content_index"]) == ("hello", 0)
    assert done["usage"] == {"type": "duration", "seconds": 1.5}
    p.from_bridge(R(response_started=inference_pb2.ResponseStarted(response_id="resp_2")))
    out = delta("i2", "hi ", False, src_out)
    assert out["type"] == "response.output_audio_transcript.delta"
    assert (out["response_id"], out["output_index"], out["content_index"]) == ("resp_2", 0, 0)
    finished = delta("i2", "there", True, src_out)
    assert finished["type"] == "response.output_audio_transcript.done"
    assert finished["transcript"] == "hi there"


def test_bridge_json_keeps_its_event_id_or_gets_one_and_non_objects_are_dropped() -> None:
    p = proto()

    def passthrough(text: str) -> list[str]:
        return p.from_bridge(R(data_channel_message=inference_pb2.DataChannelMessage(json=text)))

    own = '{"type":"rate_limits.updated","event_id":"event_model_1","rate_limits":[]}'
    assert passthrough(own) == [own]
    (stamped,) = events(passthrough('{"type":"conversation.item.added","item":{}}'))
    assert stamped["event_id"].startswith("event_t")
    assert passthrough("[]") == []
    assert passthrough("{oops") == []


def test_response_done_cancelled_has_status_details() -> None:
    p = proto()
    p.from_bridge(R(response_started=inference_pb2.ResponseStarted(response_id="resp_3")))
    (done,) = events(
        p.from_bridge(R(response_done=inference_pb2.ResponseDone(response_id="", cancelled=True)))
    )
    assert done["response"]["id"] == "resp_3"  # an empty id means the open response
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["type"] == "cancelled"


def test_a_cancel_by_the_client_is_told_apart_from_a_barge_in() -> None:
    p = proto()
    for cancel_first, reason in ((True, "client_cancelled"), (False, "turn_detected")):
        p.from_bridge(R(response_started=inference_pb2.ResponseStarted(response_id="r")))
        if cancel_first:
            p.from_client('{"type":"response.cancel"}')
        (done,) = events(p.from_bridge(R(response_done=inference_pb2.ResponseDone(cancelled=True))))
        assert done["response"]["status_details"]["reason"] == reason


def test_a_bridge_clear_is_reported_only_when_the_caller_loses_audio() -> None:
    p = proto()
    assert p.cleared_by_bridge(0) == []  # nothing queued, nothing playing
    (queued,) = events(p.cleared_by_bridge(12))
    assert queued["type"] == "output_audio_buffer.cleared"
    p.playout(True)
    (playing,) = events(p.cleared_by_bridge(0))
    assert playing["type"] == "output_audio_buffer.cleared"
    assert not p.output_active


def test_per_item_state_stays_bounded_when_transcripts_never_finish() -> None:
    p = proto()
    for n in range(ITEMS_REMEMBERED * 10):
        item = f"i{n}"
        p.from_bridge(R(speech_started=inference_pb2.SpeechStarted(item_id=item)))
        p.from_bridge(
            R(
                transcript_delta=inference_pb2.TranscriptDelta(
                    item_id=item, delta="x", source=inference_pb2.TRANSCRIPT_SOURCE_OUTPUT
                )
            )
        )
    assert len(p._speech) == ITEMS_REMEMBERED
    assert len(p._transcripts) == ITEMS_REMEMBERED
