"""The listen backend: an offline voice agent that answers each caller turn with what it
understood ("you said: ..."), spoken. No network, no model download.

Turn-taking is the echo agent's (echo.py: VAD, end of turn, barge-in, push-to-talk, the
session object); only the answer differs. At the end of a turn (or on `response.create`
after a push-to-talk commit) the agent:

1. sends ResponseStarted;
2. recognises the turn's audio with PocketSphinx (libs/speech/recognition.py) in a worker
   process (a decode holds the GIL for its whole length, which would stall every session's
   paced audio in a thread) and sends the words as the item's input transcript, one final
   TranscriptDelta (source INPUT): the caller gets
   `conversation.item.input_audio_transcription.completed`;
3. speaks "you said: <words>" (or "sorry, I did not catch that") with espeak-ng, a
   subprocess the event loop does not wait on (libs/speech/synthesis.py), sends the text as
   one TranscriptDelta (source OUTPUT: `response.output_audio_transcript.delta`), plays the
   audio, then the final delta (`.done`) and ResponseDone.

Speech during the answer is a barge-in as in the echo agent: the answer's transcript is
closed (`.done` with what was said so far), then ClearAudio and the cancelled ResponseDone.
With `create_response: false` nothing is recognised until `response.create`.

The recognition processes (`listen_workers`) are shared by every session of the bridge and
started by `preload` before the bridge reports ready; `close_pool` stops them.
"""

from __future__ import annotations

import logging
from concurrent.futures.process import BrokenProcessPool

from libs.config.settings import SettingsError
from libs.observability.telemetry import log_event
from libs.speech.recognition import RecognitionPool
from libs.speech.synthesis import SynthesisError, synthesise_async
from services.bridge.audio import Samples
from services.bridge.backend import SessionContext
from services.bridge.echo import EchoAgent
from services.bridge.session import Response
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge.listen")

NOT_UNDERSTOOD = "sorry, I did not catch that"

_pool: RecognitionPool | None = None


def answer_text(heard: str) -> str:
    """What the agent says back for the words it heard."""
    return f"you said: {heard}" if heard else NOT_UNDERSTOOD


def recognition_pool(settings: BridgeSettings) -> RecognitionPool:
    """The bridge's one pool of recognition processes (made on first use)."""
    global _pool
    if _pool is None:
        _pool = RecognitionPool(settings.listen_workers)
    return _pool


async def close_pool() -> None:
    """Stops the recognition processes (idempotent; the next session would start new ones)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        await pool.close()


def _forget(pool: RecognitionPool) -> None:
    """A pool whose process died is broken for good: the next session starts a new one."""
    global _pool
    if _pool is pool:
        _pool = None


async def preload(settings: BridgeSettings) -> None:
    """At start-up: the recognition processes with their model loaded, and one phrase
    spoken in `listen_voice`, so a missing model, espeak-ng or voice stops the bridge there
    (exit status 2) rather than failing the first call."""
    try:
        await recognition_pool(settings).warm_up()
    except (BrokenProcessPool, ImportError, OSError) as exc:
        await close_pool()
        raise SettingsError(f"backend listen: speech recognition cannot start: {exc}") from exc
    try:
        await synthesise_async("ready", settings.listen_voice, settings.listen_words_per_minute)
    except SynthesisError as exc:
        await close_pool()
        raise SettingsError(f"listen_voice: {exc}") from exc


class ListenAgent(EchoAgent):
    """One session of the listen backend: the echo agent's turns, a spoken answer."""

    # The energy floor (vad_energy_floor_dbfs) ends speech at its last loud sample: a word's
    # quiet release after it (the "t" of "account") is part of what the recogniser needs.
    UTTERANCE_TAIL_MS = 300

    def __init__(self, ctx: SessionContext, settings: BridgeSettings) -> None:
        super().__init__(ctx, settings)
        self._pool = recognition_pool(settings)
        self._voice = settings.listen_voice
        self._words_per_minute = settings.listen_words_per_minute
        # The answer whose output transcript is open: (item id, text so far).
        self._open_transcript: tuple[str, str] | None = None

    def _transcript(self, item_id: str, delta: str, *, final: bool, output: bool) -> None:
        source = (
            inference_pb2.TRANSCRIPT_SOURCE_OUTPUT
            if output
            else inference_pb2.TRANSCRIPT_SOURCE_INPUT
        )
        self._outbox.put(
            Response(
                transcript_delta=inference_pb2.TranscriptDelta(
                    item_id=item_id, delta=delta, final=final, source=source
                )
            )
        )

    def _close_transcript(self) -> None:
        if self._open_transcript is not None:
            item_id, _ = self._open_transcript
            self._open_transcript = None
            self._transcript(item_id, "", final=True, output=True)

    def _interrupt(self, *, clear_transceiver: bool = True) -> None:
        # The cut answer's transcript is done before its response is (OpenAI's order).
        self._close_transcript()
        super()._interrupt(clear_transceiver=clear_transceiver)

    async def _respond(self, response_id: str, utterance: Samples) -> None:
        item_id = self._item_id()
        self._outbox.put(
            Response(response_started=inference_pb2.ResponseStarted(response_id=response_id))
        )
        try:
            heard = await self._pool.recognise(utterance.astype("<i2").tobytes(), self._in_rate)
            self._transcript(item_id, heard, final=True, output=False)
            answer = answer_text(heard)
            speech = await synthesise_async(answer, self._voice, self._words_per_minute)
        except (BrokenProcessPool, SynthesisError) as exc:
            if isinstance(exc, BrokenProcessPool):
                _forget(self._pool)
            log_event(
                logger,
                "listen.failed",
                level=logging.ERROR,
                session__id=self.session_id,
                error=str(exc),
            )
            self._outbox.end(common_pb2.CLOSE_REASON_BRIDGE_ERROR, f"listen backend: {exc}")
            return
        log_event(
            logger,
            "listen.heard",
            session__id=self.session_id,
            response__id=response_id,
            words=len(heard.split()),
            utterance_ms=self._ms(len(utterance)),
        )
        answer_item = f"item_{response_id}"
        self._open_transcript = (answer_item, answer)
        self._transcript(answer_item, answer, final=False, output=True)
        await self._play(speech.at_rate(self._out_rate).pcm)
        self._close_transcript()
        self._outbox.put(
            Response(response_done=inference_pb2.ResponseDone(response_id=response_id))
        )
