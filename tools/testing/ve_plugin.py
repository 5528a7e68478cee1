"""Project pytest plugin: runs `async def` tests with a timeout and a leaked-task check.

Every coroutine test runs in a fresh event loop under `asyncio.timeout` (default 30 s,
override with `@pytest.mark.timeout_s(N)`); tasks it started and left running when it
returns fail the test, as pion's goroutine-leak check does for Go tests.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

DEFAULT_ASYNC_TIMEOUT_S = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout_s(seconds): time limit of an async test")
    config.addinivalue_line(
        "markers", "allow_leaked_tasks: do not fail on tasks left running (say why)"
    )


async def _run_checked(item: pytest.Function, kwargs: dict[str, Any], timeout_s: float) -> None:
    before = asyncio.all_tasks()
    async with asyncio.timeout(timeout_s):
        await item.obj(**kwargs)
    # Give tasks cancelled during teardown one pass of the loop to finish.
    for _ in range(3):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if leaked and item.get_closest_marker("allow_leaked_tasks") is None:
        names = ", ".join(sorted(repr(t.get_coro()) for t in leaked))
        for task in leaked:
            task.cancel()
        pytest.fail(f"test left {len(leaked)} task(s) running: {names}")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    marker = pyfuncitem.get_closest_marker("timeout_s")
    timeout_s = float(marker.args[0]) if marker else DEFAULT_ASYNC_TIMEOUT_S
    argnames = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in argnames}
    asyncio.run(_run_checked(pyfuncitem, kwargs, timeout_s))
    return True
