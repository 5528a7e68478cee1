"""Lint as tests: ruff (lint and format), mypy --strict, buildifier and the import graph (no
cycles, services keep to their folder), over every package listed in tools/lint/BUILD.bazel
(each exposes its files as :lint_srcs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tools.lint import imports, instruments

ROOT = Path.cwd()  # Bazel runs tests in the runfiles copy of the workspace.
BIN = Path(sys.executable).parent


def _files(*suffixes: str) -> list[str]:
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts and rel.parts[0] in ("external", "bazel-out"):
            continue
        if path.name.endswith(suffixes) and "_pb2" not in path.name:
            found.append(str(rel))
    return sorted(found)


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        check=False,
    )


def test_there_is_code_to_lint() -> None:
    assert len(_files(".py")) > 10


def test_ruff_check() -> None:
    result = _run([str(BIN / "ruff"), "check", "--no-cache", *_files(".py")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run([str(BIN / "ruff"), "format", "--check", "--no-cache", *_files(".py")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    cache = Path(os.environ.get("TEST_TMPDIR", "/tmp")) / "mypy-cache"
    result = _run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *_files(".py")],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buildifier() -> None:
    buildifier = os.path.abspath(os.environ["BUILDIFIER"])
    files = [f for f in _files("BUILD.bazel", ".bzl", "WORKSPACE") if "tools/bazel/" not in f]
    assert any(f.endswith("WORKSPACE") for f in files)
    result = _run([buildifier, "-mode=check", "-lint=warn", "-warnings=-native-py", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles() -> None:
    graph = imports.import_graph(imports.read_tree(ROOT, _files(".py")))
    assert len(graph) > 10
    assert imports.cycles(graph) == []


def test_services_import_only_libs_and_their_own_folder() -> None:
    graph = imports.import_graph(imports.read_tree(ROOT, _files(".py")))
    assert imports.layering_violations(graph) == []


def test_metric_instruments_come_from_the_catalogue() -> None:
    sources = imports.read_tree(ROOT, _files(".py"))
    assert instruments.stray_instruments(sources) == []
