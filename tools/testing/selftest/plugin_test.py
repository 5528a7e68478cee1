"""The project pytest plugin catches what it promises to: hangs and leaked tasks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_ARGS = ["-p", "tools.testing.ve_plugin", "-p", "no:cacheprovider", "-q"]


def _run_pytest(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "sample_test.py"
    test_file.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", *PLUGIN_ARGS, str(test_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_async_test_runs_in_a_loop() -> None:
    assert asyncio.get_running_loop().is_running()


def test_leaked_task_fails_the_test(tmp_path: Path) -> None:
    result = _run_pytest(
        tmp_path,
        """
        import asyncio

        async def test_leaks():
            asyncio.get_running_loop().create_task(asyncio.sleep(60))
        """,
    )
    assert result.returncode == 1, result.stdout
    assert "left 1 task(s) running" in result.stdout


def test_hanging_async_test_times_out(tmp_path: Path) -> None:
    result = _run_pytest(
        tmp_path,
        """
        import asyncio
        import pytest

        @pytest.mark.timeout_s(0.2)
        async def test_hangs():
            await asyncio.Event().wait()
        """,
    )
    assert result.returncode == 1, result.stdout
    assert "TimeoutError" in result.stdout


@pytest.mark.parametrize("value", [1, 2])
async def test_parametrized_async(value: int) -> None:
    await asyncio.sleep(0)
    assert value in (1, 2)
