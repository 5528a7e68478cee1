"""Waiting for a child process to say it is ready on stdout, with a deadline.

Reads the pipe's file descriptor directly: a buffered text reader may pull several lines
into its buffer at once, after which select() no longer reports the later ones and a
deadline-bound wait would miss a line that has in fact arrived. Bytes after the matching
line are consumed with it (our services print nothing on stdout after their ready line).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import IO, Any


def wait_for_line(
    process: subprocess.Popen[Any], accept: Callable[[str], bool], timeout_s: float
) -> str | None:
    """The first stdout line `accept` takes, or None at EOF or when `timeout_s` is up."""
    stream: IO[Any] | None = process.stdout
    assert stream is not None, "start the process with stdout=subprocess.PIPE"
    fd = stream.fileno()
    pending = b""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        pending += chunk
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            line = raw.decode("utf-8", errors="replace")
            if accept(line):
                return line
    return None


def wait_for_ready(process: subprocess.Popen[Any], timeout_s: float) -> dict[str, Any] | None:
    """The service's JSON ready line (`{"event": "ready", ...}`), or None."""

    def is_ready(line: str) -> bool:
        if not line.startswith("{"):
            return False
        try:
            return bool(json.loads(line).get("event") == "ready")
        except ValueError:
            return False

    line = wait_for_line(process, is_ready, timeout_s)
    if line is None:
        return None
    ready: dict[str, Any] = json.loads(line)
    return ready
