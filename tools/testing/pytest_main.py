"""Entry point of every py_pytest target: runs pytest over the files Bazel passes in."""

from __future__ import annotations

import os
import sys

import pytest


def main(argv: list[str]) -> int:
    args = [
        "-p",
        "tools.testing.ve_plugin",
        "-p",
        "no:cacheprovider",
        "--import-mode=importlib",
        "-ra",
        "--timeout=300",
    ]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        args += ["--basetemp", os.path.join(tmp, "pytest")]
    return int(pytest.main(args + argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
