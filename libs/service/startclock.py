"""How long this process has existed: the start-up timeline a restarted service logs.

Measured from the kernel's start time of the process (`/proc/self/stat`), so it includes
whatever ran before `main`: `ip netns exec`, a launcher stub that execs the interpreter,
the interpreter's own start and the imports. Resolution: one clock tick (10 ms here).
"""

from __future__ import annotations

import os
import time

_STARTTIME_FIELD = 19  # field 22 of /proc/<pid>/stat, counted after the ")" of the name


def process_age_ms() -> float:
    """Milliseconds since this process was started; 0.0 where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        started_s = int(fields[_STARTTIME_FIELD]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, (time.clock_gettime(time.CLOCK_BOOTTIME) - started_s) * 1000.0)


class Timeline:
    """Named marks of `process_age_ms()`, in the order they happened."""

    def __init__(self) -> None:
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(process_age_ms())
