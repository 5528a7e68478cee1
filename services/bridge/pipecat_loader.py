"""The `pipecat` entry of the registry: `PipecatLoader` imports the pipecat backend (and so
pipecat-ai, and the user's factory module) in a thread in `start()`, then delegates to it;
`preload` does the same imports once at start-up (the bridge's `__main__`).

Importing pipecat takes seconds (numba, onnxruntime); in the event loop it would stall every
open session. pipecat-ai is not in the bridge image: only a bridge that runs this backend
needs it (services/bridge/README.md)."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Mapping
from typing import Any

from libs.config.settings import SettingsError
from services.bridge.backend import Backend, BackendError, SessionContext
from services.bridge.settings import BridgeSettings
from voiceedge.inference.v1 import inference_pb2

MODULE = "services.bridge.pipecat_backend"


async def preload(settings: BridgeSettings) -> None:
    """At start-up: imports pipecat and the factory's module before the bridge is ready, so
    a factory that cannot load stops the bridge there and the first call does not wait."""
    try:
        module = await asyncio.to_thread(importlib.import_module, MODULE)
        await asyncio.to_thread(module.load_factory, settings.pipecat_factory)
    except (ImportError, BackendError) as exc:
        raise SettingsError(f"pipecat_factory: {exc}") from exc


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
