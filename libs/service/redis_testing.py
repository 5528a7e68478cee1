"""A real redis-server for tests: started on a free loopback port, killed by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass


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

    def start(self) -> None:
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
                "--save",
                "",
                "--appendonly",
                "no",
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
    redis = Redis(f"redis://127.0.0.1:{port}/0", port, None)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()
