"""Loads the native batched-I/O extension (libs/fastio/native/fastio.c) if it was built.

recvmmsg/sendmmsg move up to 64 datagrams per system call; what to send where stays in
Python. The relay's data plane and the transceiver's UDP mux fall back to plain asyncio
datagram I/O when this returns None.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from typing import Protocol, cast

Address = tuple[str, int]
BATCH = 64


class FastIO(Protocol):
    def recv_batch(self, fd: int, max_count: int, /) -> list[tuple[bytes, Address]]: ...

    def send_batch(self, fd: int, items: list[tuple[Address, bytes]], /) -> int: ...


def load() -> FastIO | None:
    path = Path(os.path.abspath(__file__)).parent / "native" / "fastio.so"
    if not path.exists():
        return None
    loader = importlib.machinery.ExtensionFileLoader("fastio", str(path))
    spec = importlib.util.spec_from_file_location("fastio", path, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return cast(FastIO, module)
