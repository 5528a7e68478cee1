"""Keeps the generated tables of the docs equal to the code they describe.

- Each service README's settings table, rendered by `libs.config.settings.settings_table`
  from the same fields and help lines `--help` prints.
- METRICS.md's table of every exported metric and its rename list, rendered from the
  catalogue in `libs/observability/metrics.py`.

`tables_test` fails when a doc drifts; this program rewrites them:

    ./bazelw run //tools/docs:tables            # rewrite in place
    ./bazelw run //tools/docs:tables -- --check # exit 1 naming the stale files
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from libs.config.settings import ServiceSettings, settings_table
from libs.observability.metrics import RENAMED, markdown_table

BEGIN = (
    "<!-- settings-table: generated from {source} by "
    "./bazelw run //tools/docs:tables; do not edit -->"
)
END = "<!-- end settings-table -->"
METRICS_MD = Path("METRICS.md")
METRICS_BEGIN = (
    "<!-- metrics-table: generated from libs/observability/metrics.py by "
    "./bazelw run //tools/docs:tables; do not edit -->"
)
METRICS_END = "<!-- end metrics-table -->"


@dataclass(frozen=True)
class ServiceDoc:
    name: str
    settings: str  # "module:Class"

    @property
    def readme(self) -> Path:
        return Path("services") / self.name / "README.md"

    @property
    def env_prefix(self) -> str:
        return f"VOICEEDGE_{self.name.upper()}_"

    def settings_class(self) -> type[ServiceSettings]:
        module, _, cls = self.settings.partition(":")
        found: object = getattr(importlib.import_module(module), cls)
        if not (isinstance(found, type) and issubclass(found, ServiceSettings)):
            raise TypeError(f"{self.settings} is not a ServiceSettings class")
        return found

    def source(self) -> str:
        return self.settings.partition(":")[0].replace(".", "/") + ".py"


SERVICES = (
    ServiceDoc("bridge", "services.bridge.settings:BridgeSettings"),
    ServiceDoc("geosteer", "services.geosteer.settings:GeosteerSettings"),
    ServiceDoc("relay", "services.relay.settings:RelaySettings"),
    ServiceDoc("signaling", "services.signaling.settings:SignalingSettings"),
    ServiceDoc(
        "transceiver",
        "services.transceiver.settings:TransceiverSettings",
    ),
)


FILE_CELL = re.compile(r"`([A-Za-z0-9_./]+)`")


def files_table_problems(readme_text: str, folder_files: set[str]) -> list[str]:
    """Differences between a README's "## Files" table and the folder's files: every
    non-test source file must be listed, and every listed file of the folder must exist
    (entries naming other folders, like `libs/fastio`, are not checked)."""
    start = readme_text.find("## Files")
    if start < 0:
        return ["no '## Files' section"]
    end = readme_text.find("\n## ", start + 1)
    section = readme_text[start : end if end > 0 else None]
    listed: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| file", "|---")):
            names = FILE_CELL.findall(line.split("|")[1])
            if names and "/" not in names[0]:  # a row about another folder is not checked
                listed.update(name for name in names if "/" not in name)  # nor subfolders
    wanted = {
        name
        for name in folder_files
        if name.endswith((".py", ".c")) and not name.endswith("_test.py")
    }
    problems = [f"{name} is not in the Files table" for name in sorted(wanted - listed)]
    problems += [f"{name} is listed but does not exist" for name in sorted(listed - folder_files)]
    return problems


class TableError(ValueError):
    """A README has no (or a broken) generated settings block."""


def expected_block(doc: ServiceDoc) -> str:
    return f"{BEGIN.format(source=doc.source())}\n{settings_table(doc.settings_class())}{END}"


def replace_block(text: str, doc: ServiceDoc) -> str:
    """`text` with its generated block replaced by the current table."""
    start = text.find("<!-- settings-table:")
    end = text.find(END)
    if start < 0 or end < start:
        raise TableError(f"{doc.readme}: no settings-table block (add the two marker lines)")
    return text[:start] + expected_block(doc) + text[end + len(END) :]


def _replace_for(doc: ServiceDoc, text: str) -> str:
    return replace_block(text, doc)


def metrics_block() -> str:
    renames = ["| before | now |", "|---|---|"]
    renames += [f"| `{old}` | `{new}` |" for old, new in sorted(RENAMED.items())]
    return (
        f"{METRICS_BEGIN}\n{markdown_table()}\nRenamed on 2026-12-02 (update dashboards and "
        f"alerts):\n\n" + "\n".join(renames) + f"\n{METRICS_END}"
    )


def replace_metrics_block(text: str) -> str:
    start = text.find("<!-- metrics-table:")
    end = text.find(METRICS_END)
    if start < 0 or end < start:
        raise TableError(f"{METRICS_MD}: no metrics-table block (add the two marker lines)")
    return text[:start] + metrics_block() + text[end + len(METRICS_END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale READMEs, write none")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY", "."))
    stale = []
    edits: list[tuple[Path, Callable[[str], str]]] = [
        (doc.readme, functools.partial(_replace_for, doc)) for doc in SERVICES
    ]
    edits.append((METRICS_MD, replace_metrics_block))
    for rel, edit in edits:
        path = root / rel
        text = path.read_text()
        updated = edit(text)
        if updated != text:
            stale.append(str(rel))
            if not args.check:
                path.write_text(updated)
    verb = "stale" if args.check else "rewritten"
    print(f"{len(stale)} of {len(edits)} docs {verb}: {', '.join(stale) or '-'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
