"""Starts the whole edge as separate processes on loopback, wired together over real gRPC.

Used by `//:demo` and by the end-to-end tests. Each service is its own process (the Bazel
binary), started in dependency order; the stack waits for each one's JSON ready line, and
for the transceiver to be registered in geosteer before it starts the relay and signaling.
`Stack.stop()` sends one SIGTERM to each (drain) and waits for them to exit on their own
within their drain grace plus a margin for closing; a second signal to the supervisor (the
`force` event) sends each a second SIGTERM, which makes it stop at once. SIGKILL is the
last resort for a child that ignores both, and is reported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from libs.service.readiness import wait_for_ready
from tools.netsim.net import entered_namespace
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

READY_TIMEOUT_S = 60.0
REGISTER_TIMEOUT_S = 30.0
# Every child drains for at most this long (passed as --drain-grace-s) ...
DRAIN_GRACE_S = 10.0
# ... and then needs up to this long to close (sockets, Redis, workers, the gRPC server).
CLOSE_MARGIN_S = 5.0
# After the second SIGTERM a child must be gone within this long.
FORCED_EXIT_S = 3.0
ROOT = Path(os.path.abspath(__file__)).parents[2]


@dataclass(frozen=True)
class Placement:
    """Where one service runs: a network namespace ("": this one) and the address its
    listeners bind (gRPC, and the transceiver's media socket)."""

    netns: str = ""
    host: str = "127.0.0.1"


@dataclass
class StackConfig:
    """Where things listen. Port 0 means any free port (tests); the demo uses fixed ones.
    By default everything is on 127.0.0.1 here; tools/netsim places services on hosts."""

    relay_udp_port: int = 3478
    relay_tcp_port: int = 0  # the relay's ICE-TCP port on relay_public_host; 0: no TCP
    http_port: int = 8080
    grpc_ports: dict[str, int] = field(default_factory=dict)  # service -> port (0: free)
    api_key: str = ""
    redis_url: str = ""
    extra_flags: dict[str, list[str]] = field(default_factory=dict)
    log: TextIO | None = None  # where child stderr goes (default: our stderr)
    workdir: Path | None = None  # for generated config files
    placement: dict[str, Placement] = field(default_factory=dict)  # service -> where
    relay_public_host: str = "127.0.0.1"  # the relay's public UDP address (the VIP)
    http_host: str = "127.0.0.1"  # where signaling's public HTTP API listens
    # Prometheus /metrics of every service: None off; else service -> port (absent or 0: free).
    metrics_ports: dict[str, int] | None = None
    # Geosteer processes ("geosteer", "geosteer-2", ...); more than one share redis_url's
    # registry, and every other service is given all their addresses.
    geosteer_replicas: int = 1


@dataclass
class Service:
    name: str
    process: subprocess.Popen[str]
    ready: dict[str, Any]
    flags: list[str] = field(default_factory=list)  # what start_stack launched it with


@dataclass
class Stack:
    services: dict[str, Service] = field(default_factory=dict)
    relay_udp: tuple[str, int] = ("127.0.0.1", 0)
    http_base: str = ""
    api_key: str = ""
    # Starts a service again with its flags and a gRPC port (0: as configured; fault tests:
    # a restart after kill -9).
    launcher: Callable[[str, list[str], int], Service] | None = None

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash would (the process is ours: started by start_stack)."""
        process = self.services[name].process
        process.kill()
        process.wait(timeout=10)

    def start_again(self, name: str) -> Service:
        """Launches `name` again with the flags it had; returns once it is ready. The old
        process may still run (a replacement binding beside it) or be gone."""
        assert self.launcher is not None
        return self.launcher(name, self.services[name].flags, 0)

    def grpc(self, name: str) -> str:
        return str(self.services[name].ready["grpc"])

    def metrics(self, name: str) -> str:
        """host:port of the service's /metrics (StackConfig.metrics_ports set)."""
        return str(self.services[name].ready["metrics"])

    def stop(self, force: threading.Event | None = None) -> dict[str, int]:
        """Stops every child (see `stop_processes`); their exit codes by name."""
        procs = [(s.name, s.process) for s in reversed(list(self.services.values()))]
        return stop_processes(procs, force=force)

    def restart(self, name: str) -> Service:
        """Starts `name` again with the flags it had, on the gRPC (and HTTP) port it had (a
        fault test's kill -9 and restart: the old process must have exited); returns once
        it is ready."""
        assert self.launcher is not None
        old = self.services[name]
        flags = list(old.flags)
        if "--http-listen" in flags and "http" in old.ready:
            flags[flags.index("--http-listen") + 1] = str(old.ready["http"])
        return self.launcher(name, flags, int(str(old.ready["grpc"]).rpartition(":")[2]))

    def check_alive(self) -> str | None:
        for service in self.services.values():
            if service.process.poll() is not None:
                return f"{service.name} exited with {service.process.returncode}"
        return None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str) -> str:
    name = name.partition("-")[0]  # a replica ("geosteer-2") runs its service's binary
    path = ROOT / "services" / name / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: depend on //services/{name} in data")
    return str(path)


def _pump(name: str, stream: TextIO, sink: TextIO, tail: deque[str] | None = None) -> None:
    for line in stream:
        sink.write(f"[{name}] {line}")
        sink.flush()
        if tail is not None:
            tail.append(line.rstrip())


def _wait_ready(name: str, process: subprocess.Popen[str]) -> dict[str, Any]:
    ready = wait_for_ready(process, READY_TIMEOUT_S)
    if ready is None:
        raise RuntimeError(f"{name} did not become ready (exit code {process.poll()})")
    return ready


def launch_process(
    name: str, command: list[str], env: dict[str, str], sink: TextIO
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Starts one service process (its own session), copies its output to `sink` with a
    `[name]` prefix, and returns once it printed its ready line; stops it and raises
    RuntimeError (with its last line) if it never does."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which then
        # drains each child with exactly one SIGTERM.
        start_new_session=True,
    )
    assert process.stderr is not None
    assert process.stdout is not None
    last_lines: deque[str] = deque(maxlen=1)
    threading.Thread(
        target=_pump, args=(name, process.stderr, sink, last_lines), daemon=True
    ).start()
    try:
        ready = _wait_ready(name, process)
    except RuntimeError as exc:
        stop_processes([(name, process)])
        said = f": {last_lines[-1]}" if last_lines else ""
        raise RuntimeError(f"{exc}{said}") from None
    threading.Thread(target=_pump, args=(name, process.stdout, sink), daemon=True).start()
    return process, ready


def stop_processes(
    processes: Sequence[tuple[str, subprocess.Popen[str]]],
    *,
    grace_s: float = DRAIN_GRACE_S + CLOSE_MARGIN_S,
    force: threading.Event | None = None,
) -> dict[str, int]:
    """One SIGTERM each (drain); wait up to `grace_s` for all to exit on their own. When
    `force` is set meanwhile, a second SIGTERM each (the runtime's "stop now"). SIGKILL
    only for a child still there after that, with a line saying so. Returns exit codes."""
    alive = [(name, p) for name, p in processes if p.poll() is None]
    for _, process in alive:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    forced = False
    # Bounded: ends at the deadline, which forcing only brings closer.
    while alive and time.monotonic() < deadline:
        if force is not None and force.is_set() and not forced:
            forced = True
            for _, process in alive:
                process.send_signal(signal.SIGTERM)
            deadline = min(deadline, time.monotonic() + FORCED_EXIT_S)
        name, process = alive[0]
        try:
            process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        alive = [(n, p) for n, p in alive if p.poll() is None]
    for name, process in alive:
        print(f"stack: {name} did not stop in time; killing it", file=sys.stderr)
        process.kill()
        process.wait(timeout=10)
    return {name: int(process.returncode) for name, process in processes}


def _wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def transceiver_offered(geosteer: str, netns: str = "") -> bool:
    """True while geosteer lists a transceiver that takes new calls (registered, not
    draining)."""
    with entered_namespace(netns), grpc.insecure_channel(geosteer) as channel:
        stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        topology = stub.ListTopology(geosteer_pb2.ListTopologyRequest(), timeout=5).topology
    return any(
        node.kind == 2 and not node.draining  # NODE_KIND_TRANSCEIVER
        for cluster in topology.clusters
        for node in cluster.nodes
    )


def start_stack(config: StackConfig) -> Stack:
    """Starts geosteer, bridge, transceiver, relay, signaling; returns once all are ready."""
    sink = config.log or sys.stderr
    workdir = config.workdir or Path(os.environ.get("TEST_TMPDIR") or tempfile.gettempdir())
    stack = Stack(api_key=config.api_key)
    relay_port = config.relay_udp_port or free_udp_port()
    stack.relay_udp = (config.relay_public_host, relay_port)
    topology = workdir / f"topology-{os.getpid()}-{relay_port}.toml"
    tcp_address = f"{config.relay_public_host}:{config.relay_tcp_port}"
    tcp_vip = (
        f', {{ address = "{tcp_address}", transport = "tcp" }}' if config.relay_tcp_port else ""
    )
    topology.write_text(
        "[[clusters]]\n"
        'id = 1\nname = "local"\nregion = "dev"\n'
        "latitude = 50.11\nlongitude = 8.68\ncapacity_sessions = 1000\n"
        f'relay_vips = ["{config.relay_public_host}:{relay_port}"{tcp_vip}]\n'
    )
    env = dict(os.environ)
    # Each binary is Bazel's launcher stub (`#!/usr/bin/env python`, which then execs the
    # venv's interpreter): found first on PATH, this interpreter runs the stub at once
    # instead of through a version manager's shim (pyenv here: ~0.1-0.2 s per start, paid
    # by every restart a fault scenario times).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if config.api_key:
        env["VOICEEDGE_API_KEY"] = config.api_key
    redis = ["--redis-url", config.redis_url] if config.redis_url else []

    def where(name: str) -> Placement:
        return config.placement.get(name, Placement())

    def launch(name: str, flags: list[str], grpc_port: int = 0) -> Service:
        port = grpc_port or config.grpc_ports.get(name, 0)
        command = [
            _binary(name),
            "--grpc-listen",
            f"{where(name).host}:{port}",
            "--drain-grace-s",
            str(DRAIN_GRACE_S),
            *flags,
        ]
        if config.metrics_ports is not None:
            metrics_port = config.metrics_ports.get(name, 0)
            command += ["--metrics-listen", f"{where(name).host}:{metrics_port}"]
        if where(name).netns:
            command = ["ip", "netns", "exec", where(name).netns, *command]
        command += config.extra_flags.get(name.partition("-")[0], [])  # replicas: the same
        process, ready = launch_process(name, command, env, sink)
        service = Service(name, process, ready, flags)
        stack.services[name] = service
        return service

    stack.launcher = launch

    try:
        geosteer_flags = ["--topology-path", str(topology)]
        if config.geosteer_replicas > 1:
            geosteer_flags += redis
        replicas = [
            launch(f"geosteer-{i}" if i > 1 else "geosteer", geosteer_flags).ready["grpc"]
            for i in range(1, config.geosteer_replicas + 1)
        ]
        geosteer = ",".join(replicas)
        bridge = launch("bridge", []).ready["grpc"]
        launch(
            "transceiver",
            [
                "--geosteer-address",
                geosteer,
                "--bridge-address",
                bridge,
                "--media-listen",
                f"{where('transceiver').host}:0",
            ],
        )
        _wait_until(
            "the transceiver to register",
            lambda: transceiver_offered(replicas[-1], where("geosteer").netns),
            REGISTER_TIMEOUT_S,
        )
        relay_flags = [
            "--udp-listen",
            f"{config.relay_public_host}:{relay_port}",
            "--tcp-listen",
            tcp_address if config.relay_tcp_port else "",
        ]
        if where("relay").netns:  # the internal leg faces the transceivers
            relay_flags += ["--internal-listen", f"{where('relay').host}:0"]
        launch("relay", ["--geosteer-address", geosteer, *relay_flags, *redis])
        signaling = launch(
            "signaling",
            [
                "--geosteer-address",
                geosteer,
                "--http-listen",
                f"{config.http_host}:{config.http_port}",
                *redis,
            ],
        )
        stack.http_base = f"http://{signaling.ready['http']}"
        stack.api_key = config.api_key or str(signaling.ready.get("dev_api_key", ""))
        return stack
    except BaseException:
        stack.stop()
        raise
