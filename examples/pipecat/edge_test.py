"""The example Pipecat pipeline behind the whole edge: an aiortc caller through relay,
transceiver and the bridge's pipecat backend (every service its own process, real UDP and
gRPC on 127.0.0.1) hears its turn back, clears the answer by speaking over it, and sees the
call end when the pipeline hangs up."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult, ToneTrack, dominant_frequency, run_call
from tests.e2e.edge import active_sessions, edge, wait_for
from tools.demo.stack import ROOT, Stack

API_KEY = "sk-e2e-pipecat-0123456789"
FACTORY = "examples.pipecat.echo_pipeline:create_pipeline"
TONE_HZ = 440.0
ENDED = {"closed", "failed", "disconnected"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The bridge binary imports the factory from this test's runfiles (examples/pipecat).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)
    flags = {"bridge": ["--backend", "pipecat", "--pipecat-factory", FACTORY]}
    workdir = tmp_path_factory.mktemp("stack")
    try:
        with edge(workdir, API_KEY, extra_flags=flags) as running:
            yield running
    finally:
        # The services' logs (Pipecat's included) as an output of the test, for failures.
        outputs = os.environ.get("TEST_UNDECLARED_OUTPUTS_DIR")
        if outputs:
            shutil.copy(workdir / "services.log", outputs)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _loud_blocks(audio: np.ndarray, rate: int) -> np.ndarray:
    """The 20 ms blocks of `audio` louder than -30 dBFS, concatenated."""
    block = rate // 50
    blocks = audio[: len(audio) // block * block].astype(np.float64).reshape(-1, block)
    loud: np.ndarray = blocks[np.sqrt((blocks**2).mean(axis=1)) > 1000].reshape(-1)
    return loud


@pytest.mark.timeout_s(90)
async def test_the_pipeline_echoes_the_turn_then_hangs_up(stack: Stack) -> None:
    track = ToneTrack(frequency_hz=TONE_HZ)
    ended = asyncio.Event()

    async def turn_then_hang_up(pc: RTCPeerConnection, result: CallResult) -> None:
        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ENDED:
                ended.set()

        await asyncio.sleep(1.2)  # one utterance (the track is paced in real time)
        track.silent = True
        assert await result.wait_event("response.done", timeout_s=20), result.event_types()
        result.channel.send(json.dumps({"type": "example.hang_up"}))
        await asyncio.wait_for(ended.wait(), timeout=20)

    result = await run_call(stack.http_base, API_KEY, track=track, during=turn_then_hang_up)
    assert result.connected
    types = result.event_types()
    # The pipeline's own message to the caller came through the data channel.
    assert "example.turn" in types, types
    assert "response.created" in types, types
    loud = _loud_blocks(result.audio(), result.received_rate)
    assert len(loud) > result.received_rate // 2, ("less than 0.5 s of audible echo", result.events)
    heard = dominant_frequency(loud, result.received_rate)
    assert abs(heard - TONE_HZ) < TONE_HZ * 0.05, heard
    assert ended.is_set()
    await wait_for("no active transceiver sessions", lambda: active_sessions(stack) == 0, 15)


@pytest.mark.timeout_s(90)
async def test_speaking_during_the_echo_clears_it(stack: Stack) -> None:
    track = ToneTrack(frequency_hz=TONE_HZ)

    async def interrupt(pc: RTCPeerConnection, result: CallResult) -> None:
        await asyncio.sleep(2.0)  # a long turn, so its echo is still playing below
        track.silent = True
        assert await result.wait_event("response.created", timeout_s=20), result.event_types()
        await asyncio.sleep(0.3)  # let the echo play a little
        track.silent = False  # barge in
        assert await result.wait_event("output_audio_buffer.cleared", timeout_s=10)
        assert await result.wait_event("response.done", timeout_s=5)

    result = await run_call(stack.http_base, API_KEY, track=track, during=interrupt)
    seen = result.event_types()
    cleared = seen.index("output_audio_buffer.cleared")
    assert seen.index("response.created") < cleared, seen
    done = [e for e in result.events[cleared:] if e.get("type") == "response.done"]
    assert done, seen
    assert done[0]["response"]["status"] == "cancelled"
    assert stack.check_alive() is None
