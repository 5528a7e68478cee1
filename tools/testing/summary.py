"""Prints one readable line over every pytest case of the tests Bazel just ran.

Called by ./bazelw after `bazel test`; reads each target's test.xml (JUnit, written by
pytest) under bazel-testlogs. Usage: summary.py TESTLOGS_DIR LABEL...
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(argv: list[str]) -> int:
    testlogs = Path(argv[0])
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    missing = []
    for label in argv[1:]:
        package, _, name = label.lstrip("/").partition(":")
        xml = testlogs / package / name / "test.xml"
        if not xml.exists():
            missing.append(label)
            continue
        for case in ET.parse(xml).iter("testcase"):  # noqa: S314
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    for label in missing:
        print(f"voiceedge: no results for {label} (not run, or failed to build)")
        counts["failed"] += 1
    targets = len(argv) - 1
    print(f"voiceedge: {targets} test targets")
    print(
        f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
