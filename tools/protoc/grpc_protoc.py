"""protoc from grpcio-tools, with the mypy-protobuf plugins of the same virtualenv.

Bazel genrules call this instead of a system protoc so the Python stubs always match the
locked protobuf/grpcio runtime. Usage: grpc_protoc.py [protoc args...]; the flags
`--mypy_out` and `--mypy_grpc_out` work because the plugins are wired in here.
"""

from __future__ import annotations

import os
import sys
from importlib import resources

from grpc_tools import protoc


def main(argv: list[str]) -> int:
    bindir = os.path.dirname(sys.executable)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_protoc",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={os.path.join(bindir, 'protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={os.path.join(bindir, 'protoc-gen-mypy_grpc')}",
        *argv,
    ]
    return int(protoc.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
