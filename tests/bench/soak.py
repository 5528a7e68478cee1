"""Soak: issue 20's fault scenarios in sequence, each --runs times, one report with
RELIABILITY.md's figures (min / median / max).

1. Relay faults with a live call on the netsim standard layout (needs root): every scenario
   of tests/netsim/relay_faults.py through faults_relay's table (`--only` picks some).
2. Whole-process faults with real callers on loopback (tests/e2e/faults_test.py: drain,
   bridge kill and restart, transceiver kill -9 and the API, Redis and signaling restarts,
   a Chromium caller): pytest in this process once per run; each scenario's `fault:` line
   (what it measured) aggregated over the runs, and how many runs passed.

    ./bazelw run //tests/bench:soak                      # everything, 3 runs (~40 min)
    ./bazelw run //tests/bench:soak -- --runs 1 --only quiet -k test_media_bridge_kill_tells

The programs it reuses keep their own commands: `//tests/bench:faults_relay`,
`//tests/e2e:faults_test`, `//tests/e2e:faults_state_test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bench import faults_relay
from tools.netsim import net

FAULTS_TEST = Path(__file__).parent.parent / "e2e" / "faults_test.py"
DEFAULT_K = "test_media_ or test_state_"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Outcomes:
    """What pytest reported per test (call phase), collected as a plugin."""

    results: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.results[report.nodeid.rpartition("::")[2]].append(report.outcome)


def parse_fault_line(line: str) -> tuple[str, dict[str, list[float]]]:
    """`fault: drain told_ms=[1003, 1003] api_reasons=[...]` -> ("drain", {"told_ms": [...]})
    (numbers only; a value with none, such as a list of reason names, is left out)."""
    name, _, rest = line.removeprefix("fault:").strip().partition(" ")
    values: dict[str, list[float]] = {}
    for key, text in re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", rest):
        numbers = [float(n) for n in _NUMBER.findall(text)]
        if numbers and not re.search(r"[A-Za-z]", text):
            values[key] = numbers
    return name, values


def _spread(values: Sequence[float]) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return " / ".join(f"{v:.0f}" for v in (low, mid, high))


def run_process_faults(runs: int, k: str) -> tuple[dict[str, list[str]], list[str]]:
    """faults_test.py `runs` times; (outcomes per test, every `fault:` line recorded)."""
    outcomes = Outcomes()
    lines: list[str] = []
    for index in range(runs):
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            outputs = Path(tmp) / "outputs"
            outputs.mkdir()
            os.environ["TEST_UNDECLARED_OUTPUTS_DIR"] = str(outputs)
            args = ["-p", "tools.testing.ve_plugin", "-p", "no:cacheprovider"]
            args += ["--import-mode=importlib", "-q", "--timeout=300", "--basetemp", tmp + "/t"]
            code = pytest.main([*args, "-k", k, str(FAULTS_TEST)], plugins=[outcomes])
            recorded = outputs / "faults.txt"
            if recorded.exists():
                lines += [x for x in recorded.read_text().splitlines() if x.startswith("fault:")]
            print(f"process faults run {index + 1}: pytest exit {code}", file=sys.stderr)
    os.environ.pop("TEST_UNDECLARED_OUTPUTS_DIR", None)
    return dict(outcomes.results), lines


def print_process_table(outcomes: dict[str, list[str]], lines: list[str]) -> None:
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs: dict[str, int] = defaultdict(int)
    for line in lines:
        name, values = parse_fault_line(line)
        runs[name] += 1
        for key, numbers in values.items():
            figures[name][key] += numbers
    print("\n| process fault | runs recorded | measured (min / median / max) |")
    print("|---|---|---|")
    for name, keys in figures.items():
        measured = "; ".join(f"{key} {_spread(v)}" for key, v in keys.items())
        print(f"| {name} | {runs[name]} | {measured or '-'} |")
    print("\n| test | passed |")
    print("|---|---|")
    for test, results in outcomes.items():
        print(f"| {test} | {results.count('passed')} / {len(results)} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    faults_relay.add_arguments(parser)
    parser.add_argument("-k", default=DEFAULT_K, help="pytest -k over faults_test.py")
    parser.add_argument("--no-relay", action="store_true", help="skip the netsim relay part")
    parser.add_argument("--no-process", action="store_true", help="skip faults_test.py")
    args = parser.parse_args(argv)
    if not args.no_relay:
        if os.geteuid() != 0:
            print("the relay part needs root (network namespaces); --no-relay", file=sys.stderr)
            return 1
        net.sweep()
        rows = asyncio.run(faults_relay.measure(args))
    if not args.no_process:
        outcomes, lines = run_process_faults(args.runs, args.k)
    print(f"# Soak: {args.runs} run(s) of each scenario")
    if not args.no_relay:
        faults_relay.print_table(rows, args)
    if not args.no_process:
        print_process_table(outcomes, lines)
        if any(r != "passed" for results in outcomes.values() for r in results):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
