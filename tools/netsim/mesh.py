"""One process for many impaired links, each frame delayed by where it goes: the world
testbed's links (tools/netsim/world.py), where a client's delay depends on which region
it talks to.

    python -m tools.netsim.mesh --config links.json

`links.json`: `{"links": [{"ns": "<the link's middle namespace>", "delays": {"10.200.1.0/24":
12.5, ...}}, ...]}`. For each link the process enters its middle namespace (setns, per
thread) to open AF_PACKET sockets on `side-a` (the link's first host) and `side-b`, then
bridges them all from one loop, as forwarder.py does for one link. A frame's one-way delay
is that of the prefix holding its far end: the IPv4 destination going a -> b, the source
going b -> a; anything else (ARP, other prefixes) passes without delay. Each (link,
direction, prefix) keeps its own order (impair.Schedule). One process instead of one per
link: 40 idle Python processes would cost memory for nothing, and the load is a few
thousand frames a second (BENCHMARKS.md). The first stdout line is `{"ready": true}`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.netsim.forwarder import READY_TIMEOUT_S, Releases, incoming, packet_socket, read_line
from tools.netsim.impair import Profile, Schedule
from tools.netsim.net import Testbed, entered_namespace

ETHERTYPE_IPV4 = b"\x08\x00"
IPV4_SRC = slice(26, 30)
IPV4_DST = slice(30, 34)


@dataclass
class Direction:
    """One direction of one link: where frames leave, and the schedule per far end."""

    out: socket.socket | None
    routes: list[tuple[ipaddress.IPv4Network, Schedule]]
    pass_through: Schedule = field(default_factory=lambda: Schedule(Profile()))
    _cache: dict[bytes, Schedule] = field(default_factory=dict)

    def schedule_for(self, address: bytes) -> Schedule:
        found = self._cache.get(address)
        if found is None:
            ip = ipaddress.IPv4Address(address)
            found = next((s for net, s in self.routes if ip in net), self.pass_through)
            self._cache[address] = found
        return found


def directions(delays: Mapping[str, float]) -> tuple[Direction, Direction]:
    """(a -> b keyed by destination, b -> a keyed by source), same delays both ways."""

    def routes() -> list[tuple[ipaddress.IPv4Network, Schedule]]:
        ranked = sorted(
            ((ipaddress.IPv4Network(p), ms) for p, ms in delays.items()),
            key=lambda entry: -entry[0].prefixlen,  # longest prefix first
        )
        return [(net, Schedule(Profile(delay_ms=ms))) for net, ms in ranked]

    return Direction(None, routes()), Direction(None, routes())


class Mesh:
    def __init__(self, links: Sequence[Mapping[str, Any]]) -> None:
        self.selector = selectors.DefaultSelector()
        self.releases = Releases()
        self._stop = False
        self._reload: Path | None = None
        self._directions: list[tuple[Direction, Direction]] = []
        for link in links:
            with entered_namespace(str(link["ns"])):
                side_a, side_b = packet_socket("side-a"), packet_socket("side-b")
            up, down = directions(link.get("delays", {}))
            up.out, down.out = side_b, side_a
            self._directions.append((up, down))
            self.selector.register(side_a, selectors.EVENT_READ, (up, IPV4_DST))
            self.selector.register(side_b, selectors.EVENT_READ, (down, IPV4_SRC))

    def stop(self, *_: Any) -> None:
        self._stop = True

    def reload_from(self, config: Path) -> None:
        """New delays from `config` (same links, same order), applied by the loop."""
        self._reload = config

    def _apply_reload(self) -> None:
        config, self._reload = self._reload, None
        assert config is not None
        links = json.loads(config.read_text())["links"]
        if len(links) != len(self._directions):
            raise ValueError(f"{len(links)} links in {config}, {len(self._directions)} running")
        for link, (up, down) in zip(links, self._directions, strict=True):
            new_up, new_down = directions(link.get("delays", {}))
            up.routes, down.routes = new_up.routes, new_down.routes
            up._cache.clear()
            down._cache.clear()
        print(json.dumps({"reloaded": True}), flush=True)

    def _ingest(self, sock: socket.socket, direction: Direction, far_end: slice) -> None:
        assert direction.out is not None
        for frame in incoming(sock):
            schedule = (
                direction.schedule_for(frame[far_end])
                if frame[12:14] == ETHERTYPE_IPV4 and len(frame) >= 34
                else direction.pass_through
            )
            release = schedule.decide(time.monotonic(), len(frame))
            if release is not None:
                self.releases.push(release, direction.out, frame)

    def run(self) -> None:
        print(json.dumps({"ready": True}), flush=True)
        timeout: float | None = None
        while not self._stop:
            if self._reload is not None:
                self._apply_reload()
            wait = 0.5 if timeout is None else min(timeout, 0.5)  # SIGTERM seen promptly
            for key, _ in self.selector.select(wait):
                direction, far_end = key.data
                self._ingest(key.fileobj, direction, far_end)  # type: ignore[arg-type]
            timeout = self.releases.release_due()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON file: {'links': [...]}")
    args = parser.parse_args(argv)
    config = Path(args.config)
    mesh = Mesh(json.loads(config.read_text())["links"])
    signal.signal(signal.SIGHUP, lambda *_: mesh.reload_from(config))
    signal.signal(signal.SIGTERM, mesh.stop)
    signal.signal(signal.SIGINT, mesh.stop)
    mesh.run()
    return 0


class MeshLinks:
    """The test side: every impaired link of a Testbed bridged by one mesh process, with
    `delays[i]` (far-end prefix -> one-way ms) on the i-th impaired link."""

    def __init__(self, testbed: Testbed, delays: Sequence[Mapping[str, float]]) -> None:
        count = len(testbed.layout.impaired_links())
        if len(delays) != count:
            raise ValueError(f"{len(delays)} delay tables for {count} impaired links")
        self._testbed = testbed
        self._config = testbed.run_dir / "mesh.json"
        self._write(delays)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = testbed.start(
            testbed.impair_ns(0),
            [sys.executable, "-m", "tools.netsim.mesh", "--config", str(self._config)],
            name="mesh",
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = read_line(self.process, READY_TIMEOUT_S)
        if '"ready"' not in line:
            raise RuntimeError(f"mesh forwarder did not start: {line!r}")

    def _write(self, delays: Sequence[Mapping[str, float]]) -> None:
        links = [
            {"ns": self._testbed.impair_ns(i), "delays": dict(d)} for i, d in enumerate(delays)
        ]
        self._config.write_text(json.dumps({"links": links}))

    def set_delays(self, delays: Sequence[Mapping[str, float]]) -> None:
        """New delay tables on the running links (a route changes): SIGHUP, and back
        once the mesh applied them. Frames already queued keep their release time."""
        if len(delays) != len(self._testbed.layout.impaired_links()):
            raise ValueError("one delay table per impaired link")
        self._write(delays)
        self.process.send_signal(signal.SIGHUP)
        line = read_line(self.process, READY_TIMEOUT_S)
        if '"reloaded"' not in line:
            raise RuntimeError(f"mesh forwarder did not reload: {line!r}")


if __name__ == "__main__":
    sys.exit(main())
