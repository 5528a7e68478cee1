"""Loads the native batched-I/O extension (libs/fastio/native/fastio.c) if it was built.

recvmmsg/sendmmsg move up to 64 datagrams per system call; what to send where stays in
Python. The relay's data plane and the transceiver's UDP mux fall back to plain asyncio
datagram I/O when this returns None.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import socket
from pathlib import Path
from typing import Any, Protocol, cast

from libs.wire.framing import Address

BATCH = 64
SOCKET_BUFFER_BYTES = 4 << 20
# Linux socket(7) option numbers; the socket module does not export them.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def set_buffers(sock: socket.socket, size: int = SOCKET_BUFFER_BYTES) -> None:
    """Large socket buffers absorb scheduling hiccups (a 20 ms pacer burst of hundreds of
    sessions overflows Linux's default ~200 KiB receive buffer). The *FORCE options (root
    or CAP_NET_ADMIN) pass net.core.rmem_max/wmem_max; otherwise the capped request
    stands."""
    for forced, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


class FastIO(Protocol):
    def recv_batch(self, fd: int, max_count: int, /) -> list[tuple[bytes, Address]]: ...

    def send_batch(self, fd: int, items: list[tuple[Address, bytes]], /) -> int: ...


def load_extension(path: Path) -> Any:
    """The CPython extension module at `path` (its name: the file's stem), or None when it
    was not built (the optional native parts here and in services/transceiver/native)."""
    if not path.exists():
        return None
    loader = importlib.machinery.ExtensionFileLoader(path.stem, str(path))
    spec = importlib.util.spec_from_file_location(path.stem, path, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load() -> FastIO | None:
    module = load_extension(Path(os.path.abspath(__file__)).parent / "native" / "fastio.so")
    return cast(FastIO | None, module)
