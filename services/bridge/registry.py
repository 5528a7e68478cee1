"""The backends by name: `--backend` picks one. A new backend is one entry here (and its
name in settings.BACKENDS, which a test keeps equal to this table)."""

from __future__ import annotations

from collections.abc import Mapping

from services.bridge.backend import BackendFactory
from services.bridge.echo import EchoAgent
from services.bridge.listen import ListenAgent
from services.bridge.pipecat_loader import PipecatLoader
from services.bridge.realtime import RealtimeAdapter

FACTORIES: Mapping[str, BackendFactory] = {
    "echo": EchoAgent,
    "realtime": RealtimeAdapter,
    "pipecat": PipecatLoader,
    "listen": ListenAgent,
}
