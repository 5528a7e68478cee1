"""A real redis-server for tests: started on a free loopback port, killed by PID.

It runs as voiceedge ships Redis (deploy/k8s/overlays/dev/redis.yaml, RELIABILITY.md):
append-only file, fsync every second, no RDB snapshots, in a directory of its own (`data_dir`,
a fresh temporary one by default), so a test can kill -9 it and `start()` it again on the
same port and data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# What voiceedge's Redis runs with (the dev manifest passes the same flags).
PERSISTENCE_FLAGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Redis:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None
    host: str = "127.0.0.1"  # tools/netsim binds it on a cluster host's address
    data_dir: Path | None = None  # where the append-only file lives

    def start(self) -> None:
        if self.data_dir is None:  # kept: a restart finds its append-only file again
            self.data_dir = Path(tempfile.mkdtemp(prefix="redis-"))
        executable = shutil.which("redis-server")
        if executable is None:
            raise AssertionError("redis-server missing: ./bazelw installs it (apt redis-server)")
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                *PERSISTENCE_FLAGS,
                "--dir",
                str(self.data_dir),
                # Off the loopback, protected mode refuses clients without a password.
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded wait for the port to accept
            with socket.socket() as probe, contextlib.suppress(OSError):
                probe.connect((self.host, self.port))
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="redis-") as data:
        redis = Redis(f"redis://127.0.0.1:{port}/0", port, None, data_dir=Path(data))
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()
