"""Small asyncio idioms every service uses, written once."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from google.protobuf import timestamp_pb2


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels `tasks` (None entries are skipped) and waits until each has finished.

    A task's own CancelledError is expected and absorbed; a cancellation of the caller
    while it waits is not (it propagates, as `with suppress(CancelledError)` would not let
    it); any other exception a task ends with propagates too: it is a bug to see.
    """
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise


def timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for a wall-clock time in seconds."""
    # Whole seconds apart from the fraction: `seconds * 1e9` as one float loses ~100 ns.
    whole = math.floor(unix_seconds)
    nanos = min(999_999_999, round((unix_seconds - whole) * 1e9))
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)
