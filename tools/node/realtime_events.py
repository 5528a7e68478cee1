"""Runs realtime_events.js, the Agents SDK event check, from a Bazel test.

The paths come from the environment that `realtime_events_test` (defs.bzl) sets: the
validator script, the SDK's openaiRealtimeEvents.js and, for the macro's own test, the JSONL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


def validate(
    events: Sequence[Path], allow_generic: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """The validator's exit status and output for these JSONL files (never raises on FAIL)."""
    node = shutil.which("node")
    if node is None:
        raise AssertionError("node missing: ./bazelw installs Debian nodejs")
    command = [
        node,
        os.environ["REALTIME_EVENTS_VALIDATOR"],
        os.environ["REALTIME_EVENTS_SDK"],
    ]
    for event_type in allow_generic:
        command += ["--allow-generic", event_type]
    command += [str(path) for path in events]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
