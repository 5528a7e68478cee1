"""cancel_and_wait: absorbs the tasks' cancellation, never the caller's."""

from __future__ import annotations

import asyncio

import pytest

from libs.service.aio import cancel_and_wait, timestamp


async def test_tasks_are_cancelled_and_finished() -> None:
    cleaned = asyncio.Event()

    async def worker() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    first, second = asyncio.ensure_future(worker()), asyncio.ensure_future(worker())
    await asyncio.sleep(0)
    await cancel_and_wait(first, None, second)
    assert first.cancelled()
    assert second.cancelled()
    assert cleaned.is_set()


async def test_finished_tasks_are_fine() -> None:
    done = asyncio.ensure_future(asyncio.sleep(0))
    await done
    await cancel_and_wait(done)


async def test_a_task_that_failed_still_raises() -> None:
    async def broken() -> None:
        raise RuntimeError("bug")

    task = asyncio.ensure_future(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="bug"):
        await cancel_and_wait(task)


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    entered = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            entered.set()
            await asyncio.Event().wait()  # slow to clean up: the caller is cancelled meanwhile

    inner = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    outer = asyncio.ensure_future(cancel_and_wait(inner))
    await entered.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert outer.cancelled()
    inner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inner


def test_timestamp() -> None:
    stamp = timestamp(1700000000.25)
    assert (stamp.seconds, stamp.nanos) == (1700000000, 250000000)
