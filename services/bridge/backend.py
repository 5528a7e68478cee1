"""What a backend is: the interface the servicer drives, what it is told about a session,
and the one signature every backend is built with (registry.py maps names to them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from services.bridge.session import Outbox
from services.bridge.settings import BridgeSettings
from voiceedge.inference.v1 import inference_pb2


class BackendError(Exception):
    """The backend cannot serve the session (e.g. the realtime endpoint refused us)."""


class Backend(Protocol):
    """One session of a backend; the servicer calls start, then the on_* hooks, then close.

    `sends_session_events` and `session_defaults` go out in SessionAccepted (see
    inference.proto): whether the backend answers `session.update` itself, else the
    defaults the transceiver reports under the session's own configuration."""

    sends_session_events: bool
    session_defaults: Mapping[str, Any] | None

    async def start(self) -> None: ...

    async def on_audio(self, frame: inference_pb2.AudioFrame) -> None: ...

    async def on_data_channel(self, text: str) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class PlayoutListener(Protocol):
    """A backend that wants to know what the caller heard: the transceiver's PlayoutReport
    after each clear (inference.proto). Optional; the servicer drops reports for a backend
    without it."""

    async def on_playout_report(self, report: inference_pb2.PlayoutReport) -> None: ...


@dataclass(frozen=True)
class SessionContext:
    """What a backend needs to know about a new session."""

    session_id: str
    input_rate_hz: int
    input_channels: int
    session_config: Mapping[str, Any]
    outbox: Outbox


# Every backend is built the same way: the session, and the bridge's settings whole.
BackendFactory = Callable[[SessionContext, BridgeSettings], Backend]
