"""The `pipecat` entry of the registry: imports the pipecat backend (and so pipecat-ai, and the
user's factory module) in a thread when its first session starts, then delegates to it.

Importing pipecat takes seconds (numba, onnxruntime); in the event loop it would stall every
open session. pipecat-ai is not in the bridge image: only a bridge that runs this backend
needs it (services/bridge/README.md)."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Mapping
from typing import Any

from services.bridge.backend import Backend, BackendError, SessionContext
from services.bridge.settings import BridgeSettings
from voiceedge.inference.v1 import inference_pb2

MODULE = "services.bridge.pipecat_backend"


class PipecatLoader:
    """A `Backend` that becomes `pipecat_backend.PipecatBackend` in `start()`."""

    sends_session_events = False
    session_defaults: Mapping[str, Any] | None = None

    def __init__(self, ctx: SessionContext, settings: BridgeSettings) -> None:
        self._ctx = ctx
        self._settings = settings
        self.backend: Backend | None = None

    async def start(self) -> None:
        try:
            module = await asyncio.to_thread(importlib.import_module, MODULE)
        except ImportError as exc:
            raise BackendError(
                f"pipecat backend unavailable (is pipecat-ai installed?): {exc}"
            ) from exc
        backend: Backend = module.PipecatBackend(self._ctx, self._settings)
        await backend.start()
        self.backend = backend

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None:
        if self.backend is not None:
            await self.backend.on_audio(frame)

    async def on_data_channel(self, text: str) -> None:
        if self.backend is not None:
            await self.backend.on_data_channel(text)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
