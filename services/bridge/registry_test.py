"""The registry names every backend the settings accept, and each entry builds a session
of its backend from the one factory signature."""

from __future__ import annotations

import pytest

from libs.config.settings import SettingsError
from services.bridge.backend import SessionContext
from services.bridge.registry import FACTORIES
from services.bridge.session import Outbox
from services.bridge.settings import BACKENDS, BridgeSettings


def test_every_backend_the_settings_accept_has_a_factory() -> None:
    assert sorted(FACTORIES) == sorted(BACKENDS)


@pytest.mark.parametrize(
    ("name", "sends_session_events"),
    # The echo agent leaves session.updated to the transceiver; the realtime model sends its own.
    # The pipecat entry is built without importing pipecat (that happens in start()).
    [("echo", False), ("realtime", True), ("pipecat", False)],
)
def test_each_factory_builds_a_session_of_its_backend(
    name: str, sends_session_events: bool
) -> None:
    # Built, not started: nothing connects (the realtime URL is a documentation address).
    settings = BridgeSettings(
        backend=name,
        realtime_url="ws://192.0.2.1:9/v1/realtime",
        pipecat_factory="examples.pipecat.echo_pipeline:create_pipeline",
    )
    settings.validate()
    ctx = SessionContext("s1", 16000, 1, {}, Outbox("s1"))
    backend = FACTORIES[name](ctx, settings)
    assert backend.sends_session_events is sends_session_events


@pytest.mark.parametrize(
    ("factory", "error"),
    [
        ("", "pipecat_factory: required when backend is pipecat"),
        ("nocolon", "expected module:function"),
        ("a.b:", "expected module:function"),
        ("a..b:c", "expected module:function"),
        ("a b:c", "expected module:function"),
    ],
)
def test_the_pipecat_backend_needs_a_module_function_factory(factory: str, error: str) -> None:
    with pytest.raises(SettingsError, match=error):
        BridgeSettings(backend="pipecat", pipecat_factory=factory).validate()
