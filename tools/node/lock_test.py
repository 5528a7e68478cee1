"""tools/node/package-lock.json stays the one source of what npm installs.

The repository rule installs with `npm ci` from a copy of the tracked lock. These tests fail
when the build would change the lock (the installed copy differs from the tracked file),
when npm put anything into node_modules that the lock does not pin, or when the lock is
incomplete in the way `npm ci` rejects (a dependency, including another platform's
optional binary, with no entry of its own).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TRACKED = Path(os.environ.get("TRACKED_LOCK", "tools/node/package-lock.json"))
INSTALLED = Path(os.environ.get("INSTALLED_LOCK", ""))
NODE_MODULES_RECORD = Path(os.environ.get("NODE_MODULES_RECORD", ""))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _resolves(packages: dict[str, Any], from_path: str, name: str) -> bool:
    """Node's lookup: node_modules/<name> beside from_path, then in each parent."""
    here = from_path
    while True:
        candidate = f"{here}/node_modules/{name}" if here else f"node_modules/{name}"
        if candidate in packages:
            return True
        if not here:
            return False
        # Up one node_modules level: "node_modules/a/node_modules/b" -> "node_modules/a".
        cut = here.rfind("/node_modules/")
        here = here[:cut] if cut >= 0 else ""


def missing_entries(lock: dict[str, Any]) -> list[str]:
    """Each 'package -> dependency' that has no entry in the lock (what npm ci refuses)."""
    packages: dict[str, Any] = lock["packages"]
    missing = []
    for path, entry in packages.items():
        optional_peers = {
            name
            for name, meta in entry.get("peerDependenciesMeta", {}).items()
            if meta.get("optional")
        }
        wanted = [
            *entry.get("dependencies", {}),
            *entry.get("optionalDependencies", {}),
            *(entry.get("devDependencies", {}) if path == "" else {}),
            *(name for name in entry.get("peerDependencies", {}) if name not in optional_peers),
        ]
        missing += [
            f"{path or '(root)'} -> {name}"
            for name in wanted
            if not _resolves(packages, path, name)
        ]
    return missing


def test_the_build_leaves_the_lock_as_tracked() -> None:
    assert INSTALLED.read_bytes() == TRACKED.read_bytes(), (
        "npm changed package-lock.json while installing: run `npm install` in tools/node "
        "and commit the lock it writes"
    )


def test_the_lock_pins_every_dependency_of_every_platform() -> None:
    assert missing_entries(_load(TRACKED)) == []


def test_node_modules_holds_only_what_the_lock_pins() -> None:
    locked = _load(TRACKED)["packages"]
    for path, entry in _load(NODE_MODULES_RECORD)["packages"].items():
        assert path in locked, f"{path} installed but not in the lock"
        assert entry["version"] == locked[path]["version"], path
        assert entry.get("integrity") == locked[path].get("integrity"), path


def test_an_incomplete_lock_is_caught() -> None:
    # The lock as it was tracked before: npm's first install on any machine added the
    # other platforms' buf binaries, rewriting the file in the source tree.
    lock = {
        "packages": {
            "": {"devDependencies": {"@bufbuild/buf": "1.75.0"}},
            "node_modules/@bufbuild/buf": {
                "optionalDependencies": {
                    "@bufbuild/buf-darwin-arm64": "1.75.0",
                    "@bufbuild/buf-linux-x64": "1.75.0",
                }
            },
            "node_modules/@bufbuild/buf-linux-x64": {"optional": True},
            "node_modules/a": {"dependencies": {"b": "1"}, "peerDependencies": {"c": "1"}},
            "node_modules/a/node_modules/b": {"dependencies": {"a": "1"}},
        }
    }
    assert missing_entries(lock) == [
        "node_modules/@bufbuild/buf -> @bufbuild/buf-darwin-arm64",
        "node_modules/a -> c",
    ]
