"""Keeps each service README's settings table equal to its settings class.

The table between the markers below is rendered by `libs.config.settings.settings_table`
from the same fields and help lines `--help` prints. `settings_tables_test` fails when a
README drifts; this program rewrites them:

    ./bazelw run //tools/docs:settings_tables            # rewrite the READMEs in place
    ./bazelw run //tools/docs:settings_tables -- --check # exit 1 naming the stale ones
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from libs.config.settings import ServiceSettings, settings_table

BEGIN = (
    "<!-- settings-table: generated from {source} by "
    "./bazelw run //tools/docs:settings_tables; do not edit -->"
)
END = "<!-- end settings-table -->"


@dataclass(frozen=True)
class ServiceDoc:
    name: str
    settings: str  # "module:Class"
    main: str  # the entry point module, whose main(["--help"]) prints the flags

    @property
    def readme(self) -> Path:
        return Path("services") / self.name / "README.md"

    @property
    def env_prefix(self) -> str:
        return f"VOICEEDGE_{self.name.upper()}_"

    def settings_class(self) -> type[ServiceSettings]:
        module, _, cls = self.settings.partition(":")
        found = getattr(importlib.import_module(module), cls)
        assert issubclass(found, ServiceSettings), self.settings
        return found

    def source(self) -> str:
        return self.settings.partition(":")[0].replace(".", "/") + ".py"


SERVICES = (
    ServiceDoc(
        "geosteer", "services.geosteer.settings:GeosteerSettings", "services.geosteer.__main__"
    ),
    ServiceDoc("relay", "services.relay.settings:RelaySettings", "services.relay.__main__"),
    ServiceDoc(
        "signaling", "services.signaling.settings:SignalingSettings", "services.signaling.__main__"
    ),
)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale READMEs, write none")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY", "."))
    stale = []
    for doc in SERVICES:
        path = root / doc.readme
        text = path.read_text()
        updated = replace_block(text, doc)
        if updated != text:
            stale.append(str(doc.readme))
            if not args.check:
                path.write_text(updated)
    verb = "stale" if args.check else "rewritten"
    print(f"{len(stale)} of {len(SERVICES)} READMEs {verb}: {', '.join(stale) or '-'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
