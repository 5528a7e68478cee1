"""Admission from measured load: how late the event loop runs, and how busy the process is.

All sessions share one event loop: their 20 ms audio ticks, ICE consent checks and bridge
batches. When that loop is saturated every call degrades at once (late frames, then lost
consent), so the transceiver refuses new sessions while the loop runs late or the process
uses nearly a whole core, before the calls it has notice. `LoopLag` samples the lateness
of a short sleep and the process's CPU time over the same interval; `LagWindow` (pure)
keeps the recent samples and gives their median, which one slow turn (a garbage
collection, a burst of set-ups) does not move.

The CPU measure exists because the lag alone does not move at capacity: the overload
benchmark (BENCHMARKS.md) read 0-2 ms of lag from 30 % to 100 % of a core, while the calls
already lost frames; the process's CPU rose with the calls (70-75 % at 90-120 clean
transcoding calls, 92-100 % from 150 on, where set-ups began to fail).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque

from libs.service.aio import cancel_and_wait


class LagWindow:
    """The last `size` samples (lag in ms, or CPU in %; never negative) and their median."""

    def __init__(self, size: int) -> None:
        self._samples: deque[float] = deque(maxlen=max(1, size))

    def add(self, lag_ms: float) -> None:
        self._samples.append(max(0.0, lag_ms))

    @property
    def median(self) -> float:
        return statistics.median(self._samples) if self._samples else 0.0


def overloaded(median: float, limit: float) -> bool:
    """True when new sessions must be refused: the median lag (ms) or CPU (% of one core)
    is over its limit; a limit of 0 turns that admission off."""
    return limit > 0 and median > limit


class LoopLag:
    """Samples the running loop's lateness (ms) and the process's CPU (all its threads, in %
    of `core`: one core, or less under a fractional cgroup quota, whose 100 % is then the
    quota) every `interval_s` into windows of `window`."""

    def __init__(self, interval_s: float, window: int, core: float = 1.0) -> None:
        self.interval_s = interval_s
        self.core = core
        self.window = LagWindow(window)  # lag, ms
        self.cpu = LagWindow(window)  # CPU, % of one core
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asleep, cpu = loop.time(), time.process_time()
            await asyncio.sleep(self.interval_s)
            elapsed = loop.time() - asleep
            self.window.add((elapsed - self.interval_s) * 1000.0)
            self.cpu.add(100.0 * (time.process_time() - cpu) / (elapsed * self.core))
