"""Builds a Layout as network namespaces, runs processes in them, and tears it all down.

`Testbed` is a context manager: every namespace it made is deleted and every process it
started is killed (by PID, SIGTERM then SIGKILL) on exit, also when the body raised.
Namespaces are named `vens<pid>x<n>-<host>`; `sweep()` deletes those whose creating process
is gone (a crashed test), together with the processes still running inside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tools.netsim import layout as layout_mod
from tools.netsim.layout import Layout

RUN_ROOT = Path("/run/netsim")
COMMAND_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
LINK_UP_TIMEOUT_S = 5.0
CLONE_NEWNET = 0x40000000
_PREFIX_RE = re.compile(rf"^{layout_mod.PREFIX_TAG}(\d+)x(\d+)-")
_counter = itertools.count()


class NetsimError(RuntimeError):
    """A command that builds or changes the testbed failed."""


def tool(name: str) -> str:
    """`name` on PATH, else in /usr/sbin or /sbin (a non-login root shell may lack them)."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    return name


def run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Runs one command to completion (bounded); returns its stdout."""
    done = subprocess.run(
        [tool(argv[0]), *argv[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    if check and done.returncode != 0:
        raise NetsimError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def missing_tools() -> list[str]:
    """What the testbed needs on PATH (./bazelw installs iproute2, nftables, conntrack)."""
    needed = ("ip", "nft", "conntrack", "ethtool", "sysctl")
    return [name for name in needed if not os.path.exists(tool(name))]


def new_prefix() -> str:
    return f"{layout_mod.PREFIX_TAG}{os.getpid()}x{next(_counter)}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listed_namespaces() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line]


def _kill_namespace_processes(ns: str) -> None:
    for text in run(["ip", "netns", "pids", ns], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(text), signal.SIGKILL)


def sweep(*, everything_of_ours: bool = False) -> list[str]:
    """Deletes the namespaces of runs whose process is gone (all ours if asked), with the
    processes inside them (which only a run of the testbed started); returns their names."""
    removed = []
    for ns in _listed_namespaces():
        match = _PREFIX_RE.match(ns)
        if match is None:
            continue
        if not everything_of_ours and _pid_alive(int(match.group(1))):
            continue
        _kill_namespace_processes(ns)
        run(["ip", "netns", "delete", ns], check=False)
        removed.append(ns)
        prefix = ns[: match.end()]
        shutil.rmtree(RUN_ROOT / prefix.rstrip("-"), ignore_errors=True)
    return removed


class Testbed:
    """A built Layout. Use as a context manager, or call build() and close()."""

    def __init__(self, layout: Layout, prefix: str | None = None) -> None:
        self.layout = layout
        self.prefix = prefix or new_prefix()
        self.run_dir = RUN_ROOT / self.prefix.rstrip("-")
        self._made: list[str] = []
        self._processes: list[tuple[str, subprocess.Popen[Any]]] = []

    # -- lifecycle -------------------------------------------------------------------

    def build(self) -> Testbed:
        missing = missing_tools()
        if missing:
            raise NetsimError(
                f"missing {missing}: ./bazelw installs them (iproute2, nftables, ...)"
            )
        sweep()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for argv in layout_mod.plan(self.layout, self.prefix):
                if argv[:3] == ["ip", "netns", "add"]:
                    self._made.append(argv[3])
                run(argv)
            self._wait_links_up()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_links_up(self) -> None:
        """Waits (bounded) for every veth to report carrier. Now and then this kernel leaves
        one end of a fresh veth pair at NO-CARRIER although both ends are up; taking that
        end down and up again fixes it."""
        deadline = time.monotonic() + LINK_UP_TIMEOUT_S
        kicked: set[tuple[str, str]] = set()
        while True:
            down = [
                (ns, link["ifname"])
                for ns in self._made
                for link in json.loads(run(["ip", "-n", ns, "-j", "link", "show"]))
                if link["ifname"] != "lo" and link.get("operstate") != "UP"
            ]
            if not down:
                return
            if time.monotonic() > deadline:
                raise NetsimError(f"links without carrier: {down}")
            time.sleep(0.1)
            for ns, name in down:
                if (ns, name) not in kicked:
                    kicked.add((ns, name))
                    run(["ip", "-n", ns, "link", "set", name, "down"])
                    run(["ip", "-n", ns, "link", "set", name, "up"])

    def close(self) -> None:
        """Idempotent: stops our processes, then deletes our namespaces."""
        self.stop_all()
        for ns in reversed(self._made):
            _kill_namespace_processes(ns)
            run(["ip", "netns", "delete", ns], check=False)
        self._made.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Testbed:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- names -----------------------------------------------------------------------

    def ns(self, host: str) -> str:
        self.layout.host(host)
        return layout_mod.namespace(self.prefix, host)

    def impair_ns(self, index: int = 0) -> str:
        return layout_mod.impair_namespace(self.prefix, index)

    def ifname(self, host: str, peer: str) -> str:
        return layout_mod.ifname(peer)

    # -- doing things in hosts -------------------------------------------------------

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return [tool("ip"), "netns", "exec", ns, *argv]

    def run_in(self, host: str, argv: Sequence[str], *, stdin: str | None = None) -> str:
        return run(self.exec_argv(self.ns(host), argv), stdin=stdin)

    def start(
        self, ns: str, argv: Sequence[str], name: str = "", **popen: Any
    ) -> subprocess.Popen[Any]:
        """Starts a process inside namespace `ns`; close() stops it (by PID)."""
        process: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(ns, argv), **popen)
        self._processes.append((name or argv[0], process))
        return process

    def stop_all(self) -> None:
        for _, process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, process in self._processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"netsim: {name} ignored SIGTERM; killing it", file=sys.stderr)
                process.kill()
                process.wait(timeout=10)
        self._processes.clear()

    @contextlib.contextmanager
    def entered(self, host: str) -> Iterator[None]:
        """Moves the calling thread into `host`'s namespace for the body (setns(2) is
        per thread): sockets it opens, and processes it starts, live there."""
        with entered_namespace(self.ns(host)):
            yield


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def entered_namespace(ns: str) -> Iterator[None]:
    """The calling thread in namespace `ns` for the body; "" stays where it is."""
    if not ns:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
