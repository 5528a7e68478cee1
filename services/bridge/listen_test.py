"""The listen backend over real gRPC: a synthesised sentence in, its transcript and a spoken
answer out; barge-in closes the answer's transcript; an empty push-to-talk turn."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from libs.speech.synthesis import INTELLIGIBILITY_SENTENCE, synthesise
from libs.speech.wer import word_error_rate
from services.bridge import listen
from services.bridge.bridge_testing import (
    RATE,
    Call,
    audio_requests,
    read,
    read_until,
    serve,
    session_start,
    silence,
)
from services.bridge.servicer import BridgeServicer
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

SETTINGS = BridgeSettings(
    backend="listen",
    end_of_turn_silence_ms=500,
    short_utterance_extra_silence_ms=0,
)
INPUT = inference_pb2.TRANSCRIPT_SOURCE_INPUT
OUTPUT = inference_pb2.TRANSCRIPT_SOURCE_OUTPUT
Messages = list[inference_pb2.StreamSessionResponse]


@pytest.fixture(scope="module", autouse=True)
def recognition_processes() -> Iterator[None]:
    """One pool for the module's tests (started by the first session); stopped at the end."""
    yield
    asyncio.run(listen.close_pool())


def sentence_at_rate() -> np.ndarray:
    speech = synthesise(INTELLIGIBILITY_SENTENCE).at_rate(RATE)
    return np.frombuffer(speech.pcm, dtype="<i2").astype(np.int16)


@contextlib.asynccontextmanager
async def listen_call() -> AsyncIterator[Call]:
    """One accepted session of a listen bridge on a real server; the caller hangs up after
    the body, and the session must be gone."""
    servicer = BridgeServicer(SETTINGS)
    async with serve(servicer) as stub:
        call = stub.StreamSession(None)
        await call.write(session_start())
        accepted = await read(call)
        assert accepted is not None
        assert accepted.HasField("session_accepted")
        yield call
        await call.write(
            inference_pb2.StreamSessionRequest(
                session_end=inference_pb2.SessionEnd(reason=common_pb2.CLOSE_REASON_CLIENT_HANGUP)
            )
        )
        assert await read(call) is None
        assert await call.code() == grpc.StatusCode.OK
    assert servicer.session_count == 0


async def send_event(call: Call, event: dict[str, Any]) -> None:
    """A client event from the data channel."""
    await call.write(
        inference_pb2.StreamSessionRequest(
            data_channel_message=inference_pb2.DataChannelMessage(json=json.dumps(event))
        )
    )


def transcripts(messages: Messages, source: int) -> list[inference_pb2.TranscriptDelta]:
    return [
        m.transcript_delta
        for m in messages
        if m.HasField("transcript_delta") and m.transcript_delta.source == source
    ]


def answer_pcm(messages: Messages) -> np.ndarray:
    data = b"".join(m.audio_frame.data for m in messages if m.HasField("audio_frame"))
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


@pytest.mark.timeout_s(90)
async def test_a_spoken_sentence_is_transcribed_and_answered_aloud() -> None:
    async with listen_call() as call:
        for request in audio_requests(np.concatenate([sentence_at_rate(), silence(1.0)])):
            await call.write(request)
        messages = await read_until(call, "response_done")

        started = next(m.speech_started for m in messages if m.HasField("speech_started"))
        (heard,) = transcripts(messages, INPUT)
        assert heard.final
        assert heard.item_id == started.item_id
        assert word_error_rate(INTELLIGIBILITY_SENTENCE, heard.delta) <= 0.2, heard.delta

        said = transcripts(messages, OUTPUT)
        assert [(t.delta, t.final) for t in said] == [
            (listen.answer_text(heard.delta), False),
            ("", True),
        ]
        assert said[0].item_id == said[1].item_id != heard.item_id
        kinds = [m.WhichOneof("payload") for m in messages]
        # The answer's transcript is done after its audio, before its response is.
        assert kinds.index("response_started") < kinds.index("audio_frame")
        assert max(i for i, k in enumerate(kinds) if k == "audio_frame") < len(kinds) - 2
        assert not messages[-1].response_done.cancelled

        audio = answer_pcm(messages)
        seconds = len(audio) / RATE
        assert 2.0 < seconds < 10.0, seconds  # "you said: " and ten words at 140 wpm
        assert np.sqrt(np.mean(audio**2)) > 500  # speech, not silence


@pytest.mark.timeout_s(90)
async def test_speech_during_the_answer_closes_its_transcript_then_cancels_it() -> None:
    sentence = sentence_at_rate()
    async with listen_call() as call:
        for request in audio_requests(np.concatenate([sentence, silence(0.8)])):
            await call.write(request)
        first = await read_until(call, "audio_frame")
        assert transcripts(first, OUTPUT)[0].final is False
        # The caller talks over the answer.
        for request in audio_requests(sentence, first_sequence=10_000):
            await call.write(request)
        later = [
            m for m in await read_until(call, "speech_started") if not m.HasField("audio_frame")
        ]
        kinds = [m.WhichOneof("payload") for m in later]
        assert kinds == ["transcript_delta", "clear", "response_done", "speech_started"], kinds
        assert later[0].transcript_delta.final
        assert later[0].transcript_delta.source == OUTPUT
        assert later[2].response_done.cancelled


@pytest.mark.timeout_s(90)
async def test_an_empty_push_to_talk_turn_is_not_understood() -> None:
    async with listen_call() as call:
        push_to_talk = {"audio": {"input": {"turn_detection": None}}}
        await send_event(call, {"type": "session.update", "session": push_to_talk})
        for request in audio_requests(silence(0.5)):
            await call.write(request)
        await send_event(call, {"type": "input_audio_buffer.commit"})
        await send_event(call, {"type": "response.create"})
        messages = await read_until(call, "response_done")
        (heard,) = transcripts(messages, INPUT)
        assert (heard.delta, heard.final) == ("", True)
        assert transcripts(messages, OUTPUT)[0].delta == listen.NOT_UNDERSTOOD
        assert len(answer_pcm(messages)) > RATE // 2
