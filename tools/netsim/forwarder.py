"""The impairment link's process: bridges two interfaces in userspace through a Schedule
per direction (impair.py), inside the link's own namespace (layout.plan builds it).

    python -m tools.netsim.forwarder --control SOCK [--a side-a --b side-b] [--up JSON]

It reads every Ethernet frame arriving on one side (AF_PACKET), asks that direction's
Schedule when to release it, and writes it out of the other side at that time. ARP goes the
same way, so the two ends see one transparent wire. Settings change while it runs through a
Unix datagram socket (`--control`): `{"op": "set", "direction": "up"|"down"|"both",
"profile": {...}, "seed": N (optional)}` and `{"op": "stats"}`, each answered with one JSON
object. The first line on stdout is `{"ready": true}` once both sides are open.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tools.netsim.impair import Profile, Schedule
from tools.netsim.net import Testbed

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # linux/if_packet.h: our own transmissions, seen on the same socket
FRAME_MAX = 65536
BATCH = 64  # frames read per readiness event, so one busy side cannot starve the timer


def packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def incoming(sock: socket.socket) -> Iterator[bytes]:
    """Up to BATCH frames waiting on `sock` (not our own transmissions), without blocking."""
    for _ in range(BATCH):
        try:
            frame, address = sock.recvfrom(FRAME_MAX)
        except BlockingIOError:
            return
        if address[2] != PACKET_OUTGOING:
            yield frame


class Releases:
    """Frames waiting for their release time, sent in time order (then arrival order)."""

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, socket.socket, bytes]] = []
        self._seq = 0
        self.sent = 0
        self.send_errors = 0

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, release: float, out: socket.socket, frame: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (release, self._seq, out, frame))

    def release_due(self) -> float | None:
        """Sends what is due; returns seconds until the next release (None: nothing)."""
        now = time.monotonic()
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                self.sent += 1
            except OSError:
                self.send_errors += 1
        return max(0.0, queue[0][0] - now) if queue else None


class Forwarder:
    def __init__(self, a: str, b: str, control: str, up: Profile, down: Profile) -> None:
        self.side_a = packet_socket(a)
        self.side_b = packet_socket(b)
        # up: frames arriving on side a (the link's first host) leave on side b.
        self.schedules = {"up": Schedule(up), "down": Schedule(down)}
        self.releases = Releases()
        if os.path.exists(control):
            os.unlink(control)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.control.bind(control)
        self.control.setblocking(False)
        self._stop = False

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _ingest(self, sock: socket.socket, direction: str, out: socket.socket) -> None:
        schedule = self.schedules[direction]
        for frame in incoming(sock):
            release = schedule.decide(time.monotonic(), len(frame))
            if release is not None:
                self.releases.push(release, out, frame)

    def _handle_control(self) -> None:
        try:
            data, peer = self.control.recvfrom(65536)
        except BlockingIOError:
            return
        try:
            request = json.loads(data)
            if request.get("op") == "set":
                direction = request.get("direction", "both")
                names = ["up", "down"] if direction == "both" else [direction]
                for offset, name in enumerate(names):
                    schedule = self.schedules[name]
                    schedule.set_profile(schedule.profile.with_changes(request["profile"]))
                    if isinstance(request.get("seed"), int):
                        schedule.reseed(request["seed"] + offset)
                reply: dict[str, Any] = {"ok": True}
            elif request.get("op") == "stats":
                reply = {
                    "ok": True,
                    "sent": self.releases.sent,
                    "send_errors": self.releases.send_errors,
                    "queued": len(self.releases),
                    **{name: s.counters() for name, s in self.schedules.items()},
                }
            else:
                reply = {"ok": False, "error": f"unknown op {request.get('op')!r}"}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "error": str(exc)}
        if peer:
            with contextlib.suppress(OSError):  # the asker went away
                self.control.sendto(json.dumps(reply).encode(), peer)

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.side_a, selectors.EVENT_READ, "a")
        selector.register(self.side_b, selectors.EVENT_READ, "b")
        selector.register(self.control, selectors.EVENT_READ, "control")
        print(json.dumps({"ready": True}), flush=True)
        timeout: float | None = None
        while not self._stop:
            # At most 0.5 s asleep, so a SIGTERM is seen promptly.
            for key, _ in selector.select(0.5 if timeout is None else min(timeout, 0.5)):
                if key.data == "a":
                    self._ingest(self.side_a, "up", self.side_b)
                elif key.data == "b":
                    self._ingest(self.side_b, "down", self.side_a)
                else:
                    self._handle_control()
            timeout = self.releases.release_due()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="side-a")
    parser.add_argument("--b", default="side-b")
    parser.add_argument("--control", required=True, help="path of the Unix control socket")
    parser.add_argument("--up", default="{}", help="JSON profile, side a -> side b")
    parser.add_argument("--down", default="{}", help="JSON profile, side b -> side a")
    args = parser.parse_args(argv)
    forwarder = Forwarder(
        args.a,
        args.b,
        args.control,
        Profile().with_changes(json.loads(args.up)),
        Profile().with_changes(json.loads(args.down)),
    )
    signal.signal(signal.SIGTERM, forwarder.stop)
    signal.signal(signal.SIGINT, forwarder.stop)
    forwarder.run()
    return 0


class ImpairedLink:
    """The test side of one forwarder: started in a Testbed, changed while it runs."""

    def __init__(
        self,
        testbed: Testbed,
        index: int = 0,
        up: Profile | None = None,
        down: Profile | None = None,
    ) -> None:
        self._control_path = control_path(testbed.run_dir, index)
        argv = [
            sys.executable,
            "-m",
            "tools.netsim.forwarder",
            "--control",
            self._control_path,
            "--up",
            json.dumps(_as_dict(up or Profile())),
            "--down",
            json.dumps(_as_dict(down or Profile())),
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = testbed.start(
            testbed.impair_ns(index),
            argv,
            name=f"impair{index}",
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = read_line(self.process, READY_TIMEOUT_S)
        if '"ready"' not in line:
            raise RuntimeError(f"impairment forwarder {index} did not start: {line!r}")

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return ask(self._control_path, request)

    def set(self, direction: str = "both", **profile: float) -> None:
        """Changes `direction` ("up": a->b, "down": b->a, "both") while running."""
        self._ask({"op": "set", "direction": direction, "profile": profile})

    def reseed(self, seed: int, direction: str = "both") -> None:
        """Restarts `direction`'s random draws from `seed` (up: seed, down: seed + 1), so a
        test sees the same loss pattern on every run."""
        self._ask({"op": "set", "direction": direction, "profile": {}, "seed": seed})

    def stats(self) -> dict[str, Any]:
        return self._ask({"op": "stats"})


READY_TIMEOUT_S = 20.0


def control_path(run_dir: Path, index: int) -> str:
    return str(run_dir / f"imp{index}.sock")


def ask(control: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request to a running forwarder's control socket; ValueError if it refused."""
    client = f"{control}.client-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if os.path.exists(client):
            os.unlink(client)
        sock.bind(client)
        sock.settimeout(5.0)
        try:
            sock.sendto(json.dumps(request).encode(), control)
            reply: dict[str, Any] = json.loads(sock.recv(65536))
        finally:
            os.unlink(client)
    if not reply.get("ok"):
        raise ValueError(reply.get("error"))
    return reply


def _as_dict(profile: Profile) -> dict[str, float]:
    return {name: float(getattr(profile, name)) for name in profile.__dataclass_fields__}


def read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The first stdout line, or "" if none within timeout_s (the process is left alone)."""
    assert process.stdout is not None
    ready = selectors.DefaultSelector()
    ready.register(process.stdout, selectors.EVENT_READ)
    if not ready.select(timeout_s):
        return ""
    return process.stdout.readline()


if __name__ == "__main__":
    sys.exit(main())
