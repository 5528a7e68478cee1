"""The transceiver entry point under cProfile, for the benchmark's --profile option:
`profiled_transceiver.py OUT.prof [transceiver flags...]` writes the profile on exit."""

from __future__ import annotations

import cProfile
import sys

from services.transceiver.__main__ import main


def run(argv: list[str]) -> int:
    out, flags = argv[0], argv[1:]
    profiler = cProfile.Profile()
    code = profiler.runcall(main, flags)
    profiler.dump_stats(out)
    return int(code)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
