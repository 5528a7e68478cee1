"""Admission from measured load: how late the event loop runs, as every session feels it.

All sessions share one event loop: their 20 ms audio ticks, ICE consent checks and bridge
batches. When that loop is saturated every call degrades at once (late frames, then lost
consent), so the transceiver refuses new sessions while the loop runs late, before the
calls it has notice. `LoopLag` samples the lateness of a short sleep; `LagWindow` (pure)
keeps the recent samples and gives their median, which one slow turn (a garbage
collection, a burst of set-ups) does not move.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque

from libs.service.aio import cancel_and_wait


class LagWindow:
    """The last `size` lag samples (ms) and their median."""

    def __init__(self, size: int) -> None:
        self._samples: deque[float] = deque(maxlen=max(1, size))

    def add(self, lag_ms: float) -> None:
        self._samples.append(max(0.0, lag_ms))

    @property
    def median_ms(self) -> float:
        return statistics.median(self._samples) if self._samples else 0.0


def overloaded(median_lag_ms: float, limit_ms: float) -> bool:
    """True when new sessions must be refused; a limit of 0 turns admission by lag off."""
    return limit_ms > 0 and median_lag_ms > limit_ms


class LoopLag:
    """Samples the running loop's lateness every `interval_s` into a window of `window`."""

    def __init__(self, interval_s: float, window: int) -> None:
        self.interval_s = interval_s
        self.window = LagWindow(window)
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
            asleep = loop.time()
            await asyncio.sleep(self.interval_s)
            self.window.add((loop.time() - asleep - self.interval_s) * 1000.0)
