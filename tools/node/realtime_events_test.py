"""The JSONL a `realtime_events_test` names: every line a typed Agents SDK server event."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.node.realtime_events import validate


def test_every_event_parses_as_a_typed_sdk_event(capsys: pytest.CaptureFixture[str]) -> None:
    allow = os.environ.get("REALTIME_EVENTS_ALLOW_GENERIC", "").split()
    result = validate([Path(os.environ["REALTIME_EVENTS"])], allow_generic=allow)
    with capsys.disabled():  # the count in test.log also when it passes
        print(result.stdout, end="")
    assert result.returncode == 0, result.stdout + result.stderr
