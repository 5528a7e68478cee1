"""The backends by name: `--backend` picks one. A new backend is one entry here (and its
name in settings.BACKENDS, which a test keeps equal to this table)."""

from __future__ import annotations

from collections.abc import Mapping

from services.bridge.backend import Backend, BackendFactory, SessionContext
from services.bridge.echo import EchoAgent
from services.bridge.realtime import RealtimeAdapter
from services.bridge.settings import BridgeSettings


def _pipecat(ctx: SessionContext, settings: BridgeSettings) -> Backend:
    # Imported on first use: pipecat-ai is not in the bridge image (see the README).
    from services.bridge.pipecat_backend import PipecatBackend

    return PipecatBackend(ctx, settings)


FACTORIES: Mapping[str, BackendFactory] = {
    "echo": EchoAgent,
    "realtime": RealtimeAdapter,
    "pipecat": _pipecat,
}
