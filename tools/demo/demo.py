"""Brings the whole edge up on loopback: every service as its own process, real gRPC.

`./bazelw run //:demo` starts geosteer, transceiver, bridge, relay and signaling in that
order, waits for each one's ready line, prints where everything listens, and stops every
process cleanly (SIGTERM, then SIGKILL after a grace period) on Ctrl-C or SIGTERM.
Set REDIS_URL to share state through Redis instead of the embedded in-memory store.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# Start order: what others call first. Each entry: service, dev gRPC port, extra flags.
SERVICES: list[tuple[str, int, list[str]]] = [
    ("geosteer", 50051, []),
    ("transceiver", 50052, []),
    ("bridge", 50055, []),
    ("relay", 50054, []),
    ("signaling", 50053, []),
]
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


def _binary(root: Path, name: str) -> Path:
    path = root / "services" / name / name
    if not path.exists():
        raise SystemExit(f"demo: {path} is missing; run through ./bazelw run //:demo")
    return path


def _pump(name: str, stream: object) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sys.stderr.write(f"[{name}] {line}")


def _wait_ready(name: str, process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                message: dict[str, object] = json.loads(line)
                if message.get("event") == "ready":
                    return message
    raise RuntimeError(f"{name} did not become ready (exit code {process.poll()})")


def stop_all(processes: Sequence[tuple[str, subprocess.Popen[str]]]) -> None:
    for _, process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for name, process in reversed(processes):
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"demo: {name} did not stop in {STOP_GRACE_S:.0f} s; killing it", file=sys.stderr)
            process.kill()
            process.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    root = Path(os.path.abspath(__file__)).parents[2]
    processes: list[tuple[str, subprocess.Popen[str]]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for name, port, flags in SERVICES:
            process = subprocess.Popen(
                [str(_binary(root, name)), "--grpc-listen", f"127.0.0.1:{port}", *flags],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                # Own session: Ctrl-C reaches only the demo, which then drains each child
                # with one SIGTERM (a second signal would force it).
                start_new_session=True,
            )
            processes.append((name, process))
            threading.Thread(target=_pump, args=(name, process.stderr), daemon=True).start()
            ready = _wait_ready(name, process)
            threading.Thread(target=_pump, args=(name, process.stdout), daemon=True).start()
            print(f"demo: {name:<12} ready  {json.dumps(ready)}", flush=True)
        print("demo: the edge is up on loopback; Ctrl-C stops every process.", flush=True)
        while not stop.is_set():
            for name, process in processes:
                if process.poll() is not None:
                    print(f"demo: {name} exited with {process.returncode}", file=sys.stderr)
                    return 1
            stop.wait(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        print("demo: stopping", file=sys.stderr)
        stop_all(processes)


if __name__ == "__main__":
    sys.exit(main())
