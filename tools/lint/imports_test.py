"""The import-graph rules on made-up trees, so the lint test's verdict on the real tree means
something."""

from __future__ import annotations

import pytest

from tools.lint.imports import cycles, import_graph, imported_names, layering_violations
from tools.lint.instruments import stray_instruments


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("import libs.wire.stun", "services.relay.router", {"libs.wire.stun"}),
        (
            "from libs.wire import stun, ufrag",
            "services.relay.router",
            {"libs.wire", "libs.wire.stun", "libs.wire.ufrag"},
        ),
        (
            "from . import topology",
            "services.relay.router",
            {"services.relay", "services.relay.topology"},
        ),
        ("from .. import wire", "libs.wire.stun", {"libs", "libs.wire"}),
        # A late import inside a function is still an import.
        ("def f():\n    import services.bridge.realtime\n", "m", {"services.bridge.realtime"}),
        # One that never runs is not.
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.b\n",
            "m",
            {"typing", "typing.TYPE_CHECKING"},
        ),
        ("if typing.TYPE_CHECKING:\n    import a\nelse:\n    import b\n", "m", {"b"}),
    ],
)
def test_imported_names(source: str, module: str, expected: set[str]) -> None:
    assert imported_names(source, module) == expected


def test_a_cycle_through_a_late_import_is_found() -> None:
    graph = import_graph(
        {
            "services.bridge.service": "from services.bridge.echo import EchoAgent\n",
            "services.bridge.echo": "def f():\n    from services.bridge import service\n",
            "services.bridge.turns": "import services.bridge.echo\n",
        }
    )
    assert cycles(graph) == [["services.bridge.echo", "services.bridge.service"]]


def test_a_long_chain_and_separate_cycles() -> None:
    chain = {f"m{i}": f"import m{i + 1}\n" for i in range(3000)}
    chain["m3000"] = ""
    assert cycles(import_graph(chain)) == []
    chain["m3000"] = "import m0\n"
    chain.update({"x": "import y\n", "y": "import x\n"})
    found = cycles(import_graph(chain))
    assert [len(c) for c in found] == [3001, 2]


def test_a_dag_has_no_cycles() -> None:
    graph = import_graph({"a": "import b\nimport c\n", "b": "import c\n", "c": ""})
    assert cycles(graph) == []


def test_services_keep_to_their_folder() -> None:
    graph = import_graph(
        {
            "services.relay.topology": "from services.geosteer.client import watch\n"
            "from services.geosteer.registry import Registry\n",
            "services.geosteer.client": "",
            "services.geosteer.registry": "",
            "services.relay.router": "from services.relay import topology\nimport libs.wire\n",
            "libs.wire": "",
            "tools.demo.stack": "import services.geosteer.registry\n",
        }
    )
    assert layering_violations(graph) == [
        "services.relay.topology imports services.geosteer.registry"
    ]


def test_instruments_outside_the_catalogue_are_found() -> None:
    sources = {
        "libs.observability.metrics": "meter.create_counter('x')\n",
        "services.relay.servicer": "import m\nm.SPEC.create(meter)\nmeter.create_histogram('y')\n",
        "services.relay.servicer_test": "meter.create_counter('z')\n",
    }
    assert stray_instruments(sources) == ["services.relay.servicer:3 create_histogram"]
