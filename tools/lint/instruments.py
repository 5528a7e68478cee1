"""Metric instruments come from the catalogue (libs/observability/metrics.py) only: a
`meter.create_counter("some_name")` anywhere else is a metric METRICS.md does not list."""

from __future__ import annotations

import ast
from collections.abc import Mapping

CATALOGUE_MODULE = "libs.observability.metrics"
FACTORIES = frozenset(
    {
        "create_counter",
        "create_up_down_counter",
        "create_histogram",
        "create_gauge",
        "create_observable_counter",
        "create_observable_gauge",
        "create_observable_up_down_counter",
    }
)


def stray_instruments(sources: Mapping[str, str]) -> list[str]:
    """`module:line create_x` for every instrument made outside the catalogue (tests may
    make their own)."""
    found = []
    for module, source in sorted(sources.items()):
        if module == CATALOGUE_MODULE or module.endswith("_test"):
            continue
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES
            ):
                found.append(f"{module}:{node.lineno} {node.func.attr}")
    return found
