"""The registry names every backend the settings accept, and each entry builds a session
of its backend from the one factory signature."""

from __future__ import annotations

import pytest

from services.bridge.backend import SessionContext
from services.bridge.registry import FACTORIES
from services.bridge.session import Outbox
from services.bridge.settings import BACKENDS, BridgeSettings


def test_every_backend_the_settings_accept_has_a_factory() -> None:
    assert sorted(FACTORIES) == sorted(BACKENDS)


@pytest.mark.parametrize(
    ("name", "sends_session_events"),
    # The echo agent leaves session.updated to the transceiver; the realtime model sends its own.
    [("echo", False), ("realtime", True)],
)
def test_each_factory_builds_a_session_of_its_backend(
    name: str, sends_session_events: bool
) -> None:
    # Built, not started: nothing connects (the realtime URL is a documentation address).
    settings = BridgeSettings(backend=name, realtime_url="ws://192.0.2.1:9/v1/realtime")
    settings.validate()
    ctx = SessionContext("s1", 16000, 1, {}, Outbox("s1"))
    backend = FACTORIES[name](ctx, settings)
    assert backend.sends_session_events is sends_session_events
