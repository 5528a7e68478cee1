"""The pipecat backend: one Pipecat pipeline per session, built by the user's factory.

`pipecat_factory` names a `module:function` called once per session as
`function(transport, session)` with a `VoiceEdgeTransport` and a `PipecatSession`; it returns
a `pipecat.pipeline.worker.PipelineWorker`, or a pipeline (any `BasePipeline`) which is run
in a worker with default parameters (no idle timeout, no RTVI). It may be a coroutine
function. The pipeline uses `transport.input()` and `transport.output()` like any Pipecat
transport.

What crosses the transport:

| bridge protocol                    | Pipecat                                                  |
|------------------------------------|----------------------------------------------------------|
| caller AudioFrame (any rate, 1-2)  | InputAudioRawFrame, mono at `pipecat_input_rate_hz`       |
| caller data-channel JSON object    | InputTransportMessageFrame(message=the decoded object)   |
| ResponseStarted                    | the first output audio after the last response ended     |
| AudioFrame, paced 20 ms (Playout)  | OutputAudioRawFrame (Pipecat resamples to sample_rate_hz) |
| ResponseDone                       | BotStoppedSpeakingFrame (after the audio before it)      |
| ClearAudio, ResponseDone cancelled | InterruptionFrame while audio is queued or playing       |
| data-channel JSON to the caller    | OutputTransportMessage(Urgent)Frame, a JSON object       |
| SessionEnd BRIDGE_ENDED (hang-up)  | the pipeline finished (EndFrame, EndWorkerFrame, cancel) |
| SessionEnd BRIDGE_ERROR            | the factory or the pipeline raised                       |

Pipecat tracks bot speech (BotStarted/StoppedSpeakingFrame) for TTSAudioRawFrame (ended by
TTSStoppedFrame) and SpeechOutputAudioRawFrame (ended by silence): a pipeline that emits bare
OutputAudioRawFrame gets no ResponseDone until it is interrupted or ends.

The caller ending the session cancels the pipeline (CancelFrame) and waits for it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
)
from pipecat.pipeline.base_pipeline import BasePipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.utils.asyncio.task_manager import TaskManager
from pipecat.workers.base_worker import WorkerParams

from libs.observability.telemetry import log_event
from libs.service.aio import cancel_and_wait
from services.bridge.audio import FRAME_MS, frame_bytes, pcm_to_mono, resample_linear
from services.bridge.backend import BackendError, SessionContext
from services.bridge.session import Playout, Response
from services.bridge.settings import BridgeSettings
from voiceedge.common.v1 import common_pb2
from voiceedge.inference.v1 import inference_pb2

logger = logging.getLogger("voiceedge.bridge.pipecat")

# write_audio_frame returns once at most this much output is queued in Playout, so Pipecat's
# own idea of what is playing (bot speaking, what an interruption drops) stays close to real
# time; Playout adds its `playout_lead_ms` at the transceiver.
QUEUED_AUDIO_MS = 100
# How long a pipeline may take from the factory's return to its StartFrame at the input.
START_TIMEOUT_S = 10.0
# How long a cancelled pipeline may take to wind down before its task is cancelled.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PipecatSession:
    """What a pipeline factory is told about its session."""

    session_id: str
    input_rate_hz: int  # of the InputAudioRawFrames the transport pushes (mono)
    output_rate_hz: int  # the transport's output rate (other rates are resampled)
    session_config: Mapping[str, Any]  # SessionStart.session_config (the OpenAI session)


PipelineFactory = Callable[
    ["VoiceEdgeTransport", PipecatSession],
    "PipelineWorker | BasePipeline | Awaitable[PipelineWorker | BasePipeline]",
]


def load_factory(spec: str) -> PipelineFactory:
    """`module:function` -> the function; BackendError if it cannot be imported."""
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"pipecat_factory {spec!r}: {exc}") from exc
    if not callable(factory):
        raise BackendError(f"pipecat_factory {spec!r}: not callable")
    return factory  # type: ignore[no-any-return]


class _Output:
    """The bridge side of the output transport: responses, interruptions, messages."""

    def __init__(self, ctx: SessionContext, settings: BridgeSettings) -> None:
        self.session_id = ctx.session_id
        self.outbox = ctx.outbox
        self.playout = Playout(ctx.outbox, settings.sample_rate_hz, settings.playout_lead_ms)
        self._frame_bytes = frame_bytes(settings.sample_rate_hz)
        self._pending = bytearray()  # output audio short of a whole 20 ms frame
        self._responses = 0
        self._response_id = ""
        self.responding = False
        self.interruptions = 0
        self.dropped_messages = 0

    def audio(self, pcm: bytes) -> None:
        if not self.responding:
            self.responding = True
            self._responses += 1
            self._response_id = f"resp_pipecat_{self._responses}"
            self.playout.enqueue_event(
                Response(
                    response_started=inference_pb2.ResponseStarted(response_id=self._response_id)
                )
            )
        self._pending += pcm
        size = self._frame_bytes
        while len(self._pending) >= size:
            self.playout.enqueue_audio(bytes(self._pending[:size]))
            del self._pending[:size]

    def response_done(self) -> None:
        """The bot stopped speaking: ResponseDone after the audio queued so far."""
        if not self.responding:
            return
        if self._pending:
            self.playout.enqueue_audio(bytes(self._pending.ljust(self._frame_bytes, b"\0")))
            self._pending.clear()
        self.responding = False
        self.playout.enqueue_event(
            Response(response_done=inference_pb2.ResponseDone(response_id=self._response_id))
        )

    def interrupt(self) -> None:
        """InterruptionFrame: drop what is queued; the transceiver clears what it holds."""
        self._pending.clear()
        if self.playout.clear():
            self.outbox.put(Response(clear=inference_pb2.ClearAudio()))
            self.interruptions += 1
            log_event(
                logger,
                "pipecat.interruption",
                session__id=self.session_id,
                response__id=self._response_id,
            )
        if self.responding:
            self.responding = False
            self.outbox.put(
                Response(
                    response_done=inference_pb2.ResponseDone(
                        response_id=self._response_id, cancelled=True
                    )
                )
            )

    def message(self, message: Any, *, urgent: bool) -> None:
        """A transport message for the caller's data channel (a JSON object, or its text)."""
        try:
            text = message if isinstance(message, str) else json.dumps(message)
            if not isinstance(json.loads(text), dict):
                raise ValueError("not a JSON object")
        except (TypeError, ValueError) as exc:
            self.dropped_messages += 1
            log_event(
                logger,
                "pipecat.message_dropped",
                level=logging.WARNING,
                session__id=self.session_id,
                error=str(exc),
            )
            return
        out = Response(data_channel_message=inference_pb2.DataChannelMessage(json=text))
        if urgent:
            self.outbox.put(out)
        else:
            self.playout.enqueue_event(out)


class _InputTransport(BaseInputTransport):
    """Pushes the session's audio and data-channel messages into the pipeline."""

    def __init__(self, params: TransportParams, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.started = asyncio.Event()

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        self.started.set()


class _OutputTransport(BaseOutputTransport):
    """Hands the pipeline's output to `_Output` (the bridge protocol)."""

    def __init__(self, params: TransportParams, output: _Output, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._out = output

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            self._out.interrupt()
        await super().process_frame(frame, direction)

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        # The media sender announces the end of bot speech through its transport: a response
        # ends there (after the audio written before it).
        if isinstance(frame, BotStoppedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM:
            self._out.response_done()
        await super().push_frame(frame, direction)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        self._out.audio(frame.audio)
        limit = QUEUED_AUDIO_MS // FRAME_MS
        # Bounded: Playout drains a frame per 20 ms, and an interruption empties it.
        for _ in range(int(self._out.playout.max_queued_frames)):
            if self._out.playout.queued_frames <= limit:
                break
            await asyncio.sleep(FRAME_MS / 1000)
        return True

    async def send_message(
        self, frame: OutputTransportMessageFrame | OutputTransportMessageUrgentFrame
    ) -> None:
        self._out.message(
            frame.message, urgent=isinstance(frame, OutputTransportMessageUrgentFrame)
        )


class VoiceEdgeTransport(BaseTransport):
    """The Pipecat transport of one voiceedge session: use `input()` and `output()` in the
    pipeline like any transport's."""

    def __init__(self, session: PipecatSession, output: _Output) -> None:
        super().__init__(name=f"VoiceEdgeTransport#{session.session_id}")
        params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=session.input_rate_hz,
            audio_in_channels=1,
            audio_out_enabled=True,
            audio_out_sample_rate=session.output_rate_hz,
            audio_out_channels=1,
            audio_out_10ms_chunks=FRAME_MS // 10,
            audio_out_end_silence_secs=0,  # a hang-up should not wait for padding
        )
        self.session = session
        self._input = _InputTransport(params, name=f"{self.name}#input")
        self._output = _OutputTransport(params, output, name=f"{self.name}#output")

    def input(self) -> _InputTransport:
        return self._input

    def output(self) -> _OutputTransport:
        return self._output


class PipecatBackend:
    """One session of the pipecat backend (the `Backend` protocol)."""

    def __init__(self, ctx: SessionContext, settings: BridgeSettings) -> None:
        self.session_id = ctx.session_id
        self._outbox = ctx.outbox
        self._in_rate = ctx.input_rate_hz
        self._channels = ctx.input_channels
        self._factory_spec = settings.pipecat_factory
        self.session = PipecatSession(
            session_id=ctx.session_id,
            input_rate_hz=settings.pipecat_input_rate_hz,
            output_rate_hz=settings.sample_rate_hz,
            session_config=ctx.session_config,
        )
        self._out = _Output(ctx, settings)
        self._lead_frames = settings.playout_lead_ms // FRAME_MS + 1
        self.transport = VoiceEdgeTransport(self.session, self._out)
        self._worker: PipelineWorker | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._playout_task: asyncio.Task[None] | None = None
        self.dropped_audio = 0  # caller audio before the pipeline started
        self.dropped_messages = 0  # caller data-channel text that is not a JSON object
        self.sends_session_events = False
        self.session_defaults: Mapping[str, Any] | None = None

    async def start(self) -> None:
        factory = await asyncio.to_thread(load_factory, self._factory_spec)
        try:
            built = factory(self.transport, self.session)
            if inspect.isawaitable(built):
                built = await built
        except Exception as exc:
            raise BackendError(f"pipecat_factory {self._factory_spec!r} raised: {exc}") from exc
        if isinstance(built, BasePipeline):
            built = PipelineWorker(
                built,
                params=PipelineParams(
                    audio_in_sample_rate=self.session.input_rate_hz,
                    audio_out_sample_rate=self.session.output_rate_hz,
                ),
                idle_timeout_secs=None,
                enable_rtvi=False,
                enable_turn_tracking=False,
            )
        if not isinstance(built, PipelineWorker):
            raise BackendError(
                f"pipecat_factory {self._factory_spec!r} returned {type(built).__name__}, "
                "not a PipelineWorker or a pipeline"
            )
        self._worker = built
        self._playout_task = asyncio.create_task(self._out.playout.run(), name="pipecat-playout")
        self._run_task = asyncio.create_task(self._run(built), name="pipecat-pipeline")
        # The caller's audio is read only once start() returns: none is lost to a pipeline
        # still starting (gRPC holds it meanwhile).
        started = asyncio.create_task(self.transport.input().started.wait())
        await asyncio.wait(
            {started, self._run_task}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        await cancel_and_wait(started)
        if not self.transport.input().started.is_set():
            await self.close()
            raise BackendError("pipecat pipeline did not start")

    async def _run(self, worker: PipelineWorker) -> None:
        """Runs the pipeline; its end is the session's (the hang-up)."""
        try:
            await worker.run(WorkerParams(task_manager=TaskManager()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log_event(
                logger,
                "pipecat.pipeline_failed",
                level=logging.ERROR,
                session__id=self.session_id,
                error=repr(exc),
            )
            self._outbox.end(common_pb2.CLOSE_REASON_BRIDGE_ERROR, f"pipecat pipeline: {exc}")
            return
        self._out.response_done()
        await self._out.playout.wait_sent()
        await self._played_out()
        log_event(logger, "pipecat.pipeline_ended", session__id=self.session_id)
        # after_playout: a transceiver that knows it ends the call on its last frame played.
        self._outbox.end(
            common_pb2.CLOSE_REASON_BRIDGE_ENDED, "pipecat pipeline ended", after_playout=True
        )

    async def _played_out(self) -> None:
        """Until the transceiver has played what was sent (a goodbye is heard in full):
        at most the playout lead, as Playout never runs further ahead."""
        for _ in range(self._lead_frames + 1):
            if not self._out.playout.audio_pending():
                return
            await asyncio.sleep(FRAME_MS / 1000)

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        if not self.transport.input().started.is_set():
            self.dropped_audio += 1
            return
        samples = pcm_to_mono(frame.data, self._channels)
        if len(samples) == 0:
            return
        if self._in_rate != self.session.input_rate_hz:
            samples = resample_linear(samples, self._in_rate, self.session.input_rate_hz)
        await self.transport.input().push_audio_frame(
            InputAudioRawFrame(
                audio=samples.astype("<i2").tobytes(),
                sample_rate=self.session.input_rate_hz,
                num_channels=1,
            )
        )

    async def on_data_channel(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not self.transport.input().started.is_set():
            self.dropped_messages += 1
            log_event(logger, "pipecat.client_event_dropped", session__id=self.session_id)
            return
        await self.transport.input().push_frame(InputTransportMessageFrame(message=message))

    async def close(self) -> None:
        playout, self._playout_task = self._playout_task, None
        worker, self._worker = self._worker, None
        run, self._run_task = self._run_task, None
        try:
            await cancel_and_wait(playout)  # nothing more goes to the caller
            if worker is not None and not worker.has_finished():
                await worker.cancel(reason="session closed")
            if run is not None:
                # The worker's own cancel lets each processor clean up; bounded all the same.
                await asyncio.wait({run}, timeout=CLOSE_TIMEOUT_S)
        finally:
            await cancel_and_wait(run)
