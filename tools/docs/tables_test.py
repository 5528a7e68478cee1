"""Every service README's settings table is the one its settings class renders and names
exactly the flags the real binary's `--help` prints; METRICS.md is the metric catalogue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.docs.tables import (
    END,
    METRICS_MD,
    SERVICES,
    ServiceDoc,
    TableError,
    expected_block,
    files_table_problems,
    replace_block,
    replace_metrics_block,
)

FLAG = re.compile(r"^\s+--([a-z0-9-]+) [A-Z0-9_]+", re.MULTILINE)
ROW = re.compile(r"^\| `([a-z0-9_]+)` \|", re.MULTILINE)


def _binary(doc: ServiceDoc) -> str:
    return os.path.abspath(os.environ[f"{doc.name.upper()}_BIN"])


@pytest.mark.parametrize("doc", SERVICES, ids=lambda d: d.name)
def test_readme_table_is_generated_from_the_settings_class(doc: ServiceDoc) -> None:
    text = doc.readme.read_text()
    assert replace_block(text, doc) == text, (
        f"{doc.readme} is stale: run ./bazelw run //tools/docs:tables"
    )
    assert doc.env_prefix in text, f"{doc.readme} should name the {doc.env_prefix} prefix"


@pytest.mark.parametrize("doc", SERVICES, ids=lambda d: d.name)
def test_readme_names_exactly_the_flags_of_help(doc: ServiceDoc) -> None:
    shown = subprocess.run(
        [_binary(doc), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    flags = {f.replace("-", "_") for f in FLAG.findall(shown)} - {"help", "config"}
    block = expected_block(doc)
    assert flags == set(ROW.findall(block))
    assert len(flags) == len(ROW.findall(block)) > 4


def test_a_readme_without_markers_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no settings-table block"):
        replace_block("# relay\n\n| setting | default |\n", SERVICES[0])
    with pytest.raises(TableError):
        replace_block(f"{END}\n<!-- settings-table: x -->\n", SERVICES[0])


def test_replacing_keeps_what_surrounds_the_block() -> None:
    doc = SERVICES[0]
    text = f"before\n<!-- settings-table: old -->\n| old |\n{END}\nafter\n"
    assert replace_block(text, doc) == f"before\n{expected_block(doc)}\nafter\n"
    assert sys.executable


def test_metrics_md_is_the_catalogue() -> None:
    text = METRICS_MD.read_text()
    assert replace_metrics_block(text) == text, (
        "METRICS.md is stale: run ./bazelw run //tools/docs:tables"
    )


@pytest.mark.parametrize("doc", SERVICES, ids=lambda d: d.name)
def test_readme_files_table_matches_the_folder(doc: ServiceDoc) -> None:
    folder = doc.readme.parent
    files = {path.name for path in folder.iterdir() if path.is_file()}
    assert files_table_problems(doc.readme.read_text(), files) == []


def test_files_table_problems_are_found() -> None:
    readme = (
        "# x\n\n## Files\n\n| file | what |\n|---|---|\n"
        "| `a.py`, `b.py` | two |\n| `gone.py` | old |\n| `libs/fastio` | elsewhere |\n"
        "\n## Settings\n\n| `c.py` | not in the Files section |\n"
    )
    files = {"a.py", "b.py", "c.py", "a_test.py", "BUILD.bazel", "README.md"}
    assert files_table_problems(readme, files) == [
        "c.py is not in the Files table",
        "gone.py is listed but does not exist",
    ]
    assert files_table_problems("# no table\n", files) == ["no '## Files' section"]
