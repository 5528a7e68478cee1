"""Test helpers: a fake transceiver (plain UDP socket on loopback), UDP clients, a real
redis-server on a free loopback port, and an in-process relay data plane."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator

from libs.wire import ufrag
from services.relay.dataplane import DataPlane
from services.relay.router import Admission, Router
from services.relay.store import BindingStore, MemoryBindingStore
from services.relay.topology import static_view

KEYS = ufrag.dev_keyring()
# Which per-packet path in-process data planes run: targets run twice (native, Python).
NATIVE_PATH = os.environ.get("VOICEEDGE_RELAY_NATIVE_PATH", "on")


def udp_socket() -> socket.socket:
    """A non-blocking loopback UDP socket for use with the `recv*` helpers below."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def recv(sock: socket.socket, timeout_s: float = 5.0) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), timeout_s)
    return data, (addr[0], addr[1])


async def recv_until_quiet(
    sock: socket.socket, quiet_s: float = 0.2, limit: int = 10_000
) -> list[bytes]:
    """Everything `sock` receives until it has been quiet for `quiet_s` (bounded)."""
    out: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        while len(out) < limit:
            out.append((await recv(sock, quiet_s))[0])
    return out


def address_of(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def data_plane(
    transceivers: list[str],
    store: BindingStore | None = None,
    udp_listen: tuple[str, ...] = ("127.0.0.1:0",),
    batched_io: bool = True,
    native_path: str = NATIVE_PATH,
    udp_gso: bool = False,
    admission: Admission | None = None,
) -> AsyncIterator[DataPlane]:
    router = Router(KEYS, static_view(transceivers), admission=admission)
    plane = DataPlane(
        router,
        store or MemoryBindingStore(),
        udp_listen=udp_listen,
        internal_listen="127.0.0.1:0",
        binding_ttl_s=30.0,
        redis_max_inflight=16,
        batched_io=batched_io,
        native_path=native_path,
        udp_gso=udp_gso,
    )
    # Under Bazel the native extensions are in the runfiles: never test only the fallback.
    assert plane.batched == batched_io, "libs/fastio/native:fastio.so did not load"
    assert plane.native == (native_path == "on"), native_path
    await plane.start()
    try:
        yield plane
    finally:
        await plane.close()
