"""Relay fault scenarios on the standard netsim layout (issue 20), each around one live
aiortc call from the client host: what `relay_faults_test` checks and what
`//tests/bench:faults_relay` measures three times and prints as RELIABILITY.md's table.

Every scenario returns a `Figures` (the audio gap the caller heard, plus what it counts);
the gap is the longest time between two of the agent's 20 ms frames reaching the caller
from just before the fault until the call has run `AFTER_S` past the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult
from tests.netsim import calls
from tools.demo.stack import Service
from tools.netsim.edge import NetEdge, standard_edge
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

GEOSTEER_PORT = 50051  # fixed, inside the cluster namespace: a restart comes back on it
AFTER_S = 3.0  # audio the call must carry after a recovery, counted in the gap window
REPLAY_PORTS = 64
FLOOD = Path(__file__).with_name("flood.py")
# The C generator (tests/bench/floodgen.c, built by Bazel): 100k+ pps and spoofed sources.
FLOODGEN = Path(os.path.abspath(__file__)).parents[1] / "bench" / "floodgen"


@contextlib.contextmanager
def fault_edge(workdir: Path, workers: int) -> Iterator[NetEdge]:
    """The standard edge these scenarios run on: geosteer on its fixed port (restarts come
    back on it), the relay with `workers` workers and Redis."""
    with standard_edge(
        workdir,
        calls.API_KEY,
        grpc_ports={"geosteer": GEOSTEER_PORT},
        extra_flags={"relay": ["--workers", str(workers)]},
    ) as edge:
        yield edge


@dataclass
class Figures:
    gap_s: float = float("nan")
    counts: dict[str, float] = field(default_factory=dict)


def relay_stats(edge: NetEdge) -> relay_pb2.RelayStats:
    with edge.testbed.entered("relay"), grpc.insecure_channel(edge.stack.grpc("relay")) as ch:
        stub = relay_pb2_grpc.RelayAdminServiceStub(ch)
        return stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats


def _transceiver_registered(edge: NetEdge) -> bool:
    with (
        edge.testbed.entered("cluster"),
        grpc.insecure_channel(edge.stack.grpc("geosteer")) as channel,
    ):
        stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
        topology = stub.ListTopology(geosteer_pb2.ListTopologyRequest(), timeout=5).topology
    return any(
        node.kind == common_pb2.NODE_KIND_TRANSCEIVER and not node.draining
        for cluster in topology.clusters
        for node in cluster.nodes
    )


async def start_geosteer_again(edge: NetEdge) -> None:
    """geosteer started again; returns once the transceiver has registered with it again,
    so the next scenario's call can be routed (the relay needs none of this)."""
    await asyncio.to_thread(edge.stack.start_again, "geosteer")
    await calls.until(
        "the transceiver to register again", lambda: _transceiver_registered(edge), 60
    )


def drops(stats: relay_pb2.RelayStats, reason: int) -> int:
    return sum(d.packets for d in stats.drops if d.reason == reason)


async def _audio_flowing(result: CallResult, frames: int = 25) -> None:
    await calls.until("audio from the agent", lambda: len(result.arrivals) > frames, 20)


async def _carried_after(result: CallResult, fault_at: float, recovered_at: float) -> float:
    """Waits until the caller has heard AFTER_S of audio after `recovered_at`; returns the
    longest gap from just before the fault to then."""
    await calls.until(
        "audio after the recovery",
        lambda: bool(result.arrivals) and result.arrivals[-1] > recovered_at + AFTER_S,
        60,
    )
    # Up to the last frame heard, so an outage longer than AFTER_S is measured whole.
    arrivals = calls.Arrivals(list(result.arrivals))
    return arrivals.longest_gap_s(min(fault_at, recovered_at - 0.5), arrivals.times[-1])


async def around_call(
    edge: NetEdge, fault: Callable[[RTCPeerConnection, CallResult], Awaitable[Figures]]
) -> Figures:
    """Places a call, runs `fault` once audio flows, returns its figures."""
    out: list[Figures] = []

    async def during(pc: RTCPeerConnection, result: CallResult) -> None:
        await _audio_flowing(result)
        out.append(await fault(pc, result))

    result = await calls.call_from_client(edge, during, connect_timeout_s=30)
    if not result.connected or not out:
        raise AssertionError(f"call failed: {result.status} {result.error_body}")
    return out[0]


async def geosteer_restart(edge: NetEdge) -> Figures:
    """geosteer kill -9, then started again (empty until the transceiver registers again)."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        before = relay_stats(edge)
        t0 = time.monotonic()
        edge.stack.kill("geosteer")
        await asyncio.to_thread(edge.stack.start_again, "geosteer")
        restarted = time.monotonic()
        gap = await _carried_after(result, t0, restarted)
        await calls.until("the transceiver back", lambda: _transceiver_registered(edge), 60)
        after = relay_stats(edge)
        unknown = drops(after, relay_pb2.DROP_REASON_UNKNOWN_SOURCE) - drops(
            before, relay_pb2.DROP_REASON_UNKNOWN_SOURCE
        )
        return Figures(gap, {"unknown_source_drops": unknown, "restart_s": restarted - t0})

    return await around_call(edge, fault)


def _startup(edge: NetEdge) -> dict[str, float]:
    """The new relay's own start-up timeline (its ready line's `startup_ms`, since its
    process started): interpreter and imports done, worker 0 forwarding, the admin up.
    Less sensitive to the machine's load than the call's gap, and apart from it."""
    marks = edge.stack.services["relay"].ready.get("startup_ms", {})
    wanted = {"main": "start_main_s", "forwarding": "start_forwarding_s", "admin": "start_admin_s"}
    return {label: marks[mark] / 1000 for mark, label in wanted.items() if mark in marks}


def _restart_relay(edge: NetEdge) -> float:
    """kill -9 of the relay, then the same binary started again; seconds it took."""
    t0 = time.monotonic()
    edge.stack.kill("relay")
    edge.stack.start_again("relay")
    return time.monotonic() - t0


def restart_relay_in_place(edge: NetEdge) -> None:
    """kill -9 of the relay, then started again with its (possibly changed) flags."""
    edge.stack.kill("relay")
    edge.stack.start_again("relay")


async def with_relay_flags(edge: NetEdge, extra: list[str], body: Awaitable[Figures]) -> Figures:
    """Runs `body` with the relay restarted with `extra` flags, then restores it."""
    flags = edge.stack.services["relay"].flags
    saved = list(flags)
    flags += extra
    await asyncio.to_thread(restart_relay_in_place, edge)
    try:
        return await body
    finally:
        flags[:] = saved
        await asyncio.to_thread(restart_relay_in_place, edge)


async def relay_restart_while_geosteer_down(edge: NetEdge) -> Figures:
    """geosteer killed; then the relay kill -9 and restarted while geosteer is still down:
    it must route the live call on its persisted topology and Redis bindings."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        edge.stack.kill("geosteer")
        try:
            t0 = time.monotonic()
            took = await asyncio.to_thread(_restart_relay, edge)
            gap = await _carried_after(result, t0, t0 + took)
            stats = relay_stats(edge)
        finally:
            await start_geosteer_again(edge)
        return Figures(
            gap,
            {
                "restart_s": took,
                "topology_transceivers": stats.topology_transceivers,
                "bindings_active": stats.bindings_active,
            },
        )

    return await around_call(edge, fault)


async def _memory_only(
    edge: NetEdge, body: Callable[[], Awaitable[Figures]], *, recall: bool = True
) -> Figures:
    """Runs `body` with the relay restarted without Redis (and so its replacements), then
    restores the relay with the shared copy for the scenarios after it. `recall` False:
    without asking the transceivers for its bindings either (what it did before that)."""
    flags = edge.stack.services["relay"].flags
    saved = list(flags)
    at = flags.index("--redis-url")
    del flags[at : at + 2]
    if not recall:
        flags.append("--recall-bindings=false")
    await asyncio.to_thread(_restart_relay, edge)
    try:
        return await body()
    finally:
        edge.stack.services["relay"].flags[:] = saved
        await asyncio.to_thread(_restart_relay, edge)


async def relay_kill_restart(edge: NetEdge, *, redis: bool = True, recall: bool = True) -> Figures:
    """The relay kill -9 and started again (geosteer up); without Redis: memory only, the
    bindings recalled from the transceiver (`recall`) or waiting for the next STUN check."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        t0 = time.monotonic()
        took = await asyncio.to_thread(_restart_relay, edge)
        gap = await _carried_after(result, t0, t0 + took)
        # From the new process's ready line to the caller's next frame: what the restart
        # costs beyond starting a process (a wait for the next STUN check without recall).
        back = calls.Arrivals(list(result.arrivals)).gaps_after(t0 + took)
        counts = {"restart_s": took, "back_after_ready_s": back}
        counts.update(_startup(edge))
        return Figures(gap, counts)

    if redis:
        return await around_call(edge, fault)
    return await _memory_only(edge, lambda: around_call(edge, fault), recall=recall)


async def relay_replacement(edge: NetEdge, *, redis: bool = True) -> Figures:
    """Zero-gap upgrade: a second relay binds the same port (SO_REUSEPORT) and reads the
    Redis copy, then the old one gets SIGTERM and drains out. Memory only: the second one
    recalls the bindings from the transceiver."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        old: Service = edge.stack.services["relay"]
        t0 = time.monotonic()
        await asyncio.to_thread(edge.stack.start_again, "relay")
        old.process.terminate()
        await asyncio.to_thread(old.process.wait, 30)
        done = time.monotonic()
        gap = await _carried_after(result, t0, done)
        return Figures(gap, {"handover_s": done - t0, **_startup(edge)})

    if redis:
        return await around_call(edge, fault)
    return await _memory_only(edge, lambda: around_call(edge, fault))


def _worker_pids(relay_pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read()
        except OSError:
            continue
        if parent == relay_pid and b"spawn_main" in argv and b"resource_tracker" not in argv:
            found.add(int(entry))
    return found


async def worker_crash(edge: NetEdge) -> Figures:
    """One relay worker process kill -9: replaced by the supervisor, the call carries on
    (the kernel moves the dead socket's flows to the others; they restore from Redis)."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        pid = edge.stack.services["relay"].process.pid
        workers = _worker_pids(pid)
        if not workers:
            raise AssertionError("the relay runs one worker: nothing to kill")
        before = relay_stats(edge)
        t0 = time.monotonic()
        os.kill(sorted(workers)[0], 9)

        def replaced() -> bool:
            stats = relay_stats(edge)
            return (
                sum(w.restarts for w in stats.workers) > sum(w.restarts for w in before.workers)
                and not stats.degraded
            )

        t_replaced = await calls.until("the worker to be replaced", replaced, 60)
        gap = await _carried_after(result, t0, t0)
        return Figures(gap, {"replaced_s": t_replaced - t0, "workers_killed": 1})

    return await around_call(edge, fault)


async def replay_from_many_ports(edge: NetEdge, ports: int = REPLAY_PORTS) -> Figures:
    """A real consent check captured on the internet router, sent again from `ports`
    source ports of a third host, ten times each: no binding, nothing reflected."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        capture = calls.Capture(edge, "inet", "to-nat", edge.relay)
        try:
            check = await asyncio.to_thread(capture.next_payload, calls.is_binding_request, 30)
        finally:
            capture.close()
        before = relay_stats(edge)
        sockets = []
        with edge.testbed.entered("other"):
            for _ in range(ports):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((edge.addresses.other, 0))
                sock.setblocking(False)
                sockets.append(sock)
        reflected = 0
        try:
            for _ in range(10):
                for sock in sockets:
                    sock.sendto(check, edge.relay)
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)  # answers would be back well within this
            for sock in sockets:
                while True:  # bounded by what the socket holds
                    try:
                        reflected += len(sock.recv(65536))
                    except BlockingIOError:
                        break
        finally:
            for sock in sockets:
                sock.close()
        bound = [b for b in calls.relay_bindings(edge) if b[0] == edge.addresses.other]
        after = relay_stats(edge)
        replayed = drops(after, relay_pb2.DROP_REASON_REPLAYED) - drops(
            before, relay_pb2.DROP_REASON_REPLAYED
        )
        t = time.monotonic()
        gap = await _carried_after(result, t, t)
        return Figures(
            gap,
            {
                "attacker_bindings": len(bound),
                "reflected_bytes": reflected,
                "replayed_drops": replayed,
            },
        )

    return await around_call(edge, fault)


async def flood(edge: NetEdge, pps: int, seconds: float, mode: str) -> Figures:
    """`pps` datagrams a second for `seconds` from a third host (tests/netsim/flood.py in
    its own process: random bytes, forged MACs, or both); the gap the call heard during it."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        username, _ = calls.ice_credentials(pc, result)
        before = relay_stats(edge)
        kernel_before = _udp_receive_errors(edge)
        argv = [sys.executable, str(FLOOD), edge.relay[0], str(edge.relay[1])]
        argv += [str(pps), str(seconds), mode, username]
        process = edge.testbed.start(
            edge.testbed.ns("other"), argv, name="flood", stdout=subprocess.PIPE, text=True
        )
        t0 = time.monotonic()
        out, _ = await asyncio.to_thread(process.communicate, None, seconds + 30)
        t1 = time.monotonic()
        gap = calls.Arrivals(list(result.arrivals)).longest_gap_s(t0, t1)
        after = relay_stats(edge)
        sent = float(out.strip().rpartition("sent=")[2] or 0)  # "errors=E sent=N"
        dropped = sum(d.packets for d in after.drops) - sum(d.packets for d in before.drops)
        return Figures(
            gap,
            {
                "sent": sent,
                "sent_pps": sent / (t1 - t0),
                "relay_dropped": dropped,
                "kernel_dropped": _udp_receive_errors(edge) - kernel_before,
            },
        )

    return await around_call(edge, fault)


def _udp_receive_errors(edge: NetEdge) -> int:
    """UDP RcvbufErrors of the relay host (/proc/net/snmp): datagrams the kernel dropped
    because a socket's receive buffer was full."""
    lines = [
        line.split()
        for line in edge.testbed.run_in("relay", ["cat", "/proc/net/snmp"]).splitlines()
    ]
    udp = [line for line in lines if line and line[0] == "Udp:"]
    names, values = udp[0], udp[1]
    return int(values[names.index("RcvbufErrors")])


async def quiet(edge: NetEdge, seconds: float) -> Figures:
    """No fault: the call's longest gap over `seconds` (the reference for the others)."""

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        return Figures(calls.Arrivals(list(result.arrivals)).longest_gap_s(t0, time.monotonic()))

    return await around_call(edge, fault)


# ---- floods from the C generator (issue 18): 100k+ pps, spoofed sources ---------------------

SPOOF_PREFIX = "10.77.0.0/16"  # the spoofed sources: inside 10/8, used by nothing else here
FLOOD_KINDS = ("random", "forged", "dtls")


def spoof_route(edge: NetEdge) -> None:
    """The internet router sends SPOOF_PREFIX back towards the flooding host, so its
    spoofed datagrams pass reverse-path filtering as a real botnet's would. Idempotent."""
    edge.testbed.run_in(
        "inet", ["ip", "route", "replace", SPOOF_PREFIX, "via", edge.addresses.other]
    )


def socket_drops(edge: NetEdge, host: str, port: int) -> int:
    """Datagrams the kernel dropped on `host`'s UDP sockets bound to `port` (receive buffer
    full): the drops column of /proc/net/udp, summed over the SO_REUSEPORT sockets."""
    total = 0
    for line in edge.testbed.run_in(host, ["cat", "/proc/net/udp"]).splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 13 and int(fields[1].rpartition(":")[2], 16) == port:
            total += int(fields[-1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and every live descendant (the relay's workers)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:  # bounded: /proc's process tree has no cycles
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += children.get(current, [])
    return total


def floodgen_argv(
    floodgen: Path,
    target: tuple[str, int],
    pps: int,
    seconds: float,
    kind: str,
    username: str,
    spoof: bool,
) -> list[str]:
    argv = [str(floodgen), "flood", target[0], str(target[1]), str(pps), str(seconds), kind]
    return [*argv, username or "x:y", *([SPOOF_PREFIX] if spoof else [])]


def parse_counts(line: str) -> dict[str, float]:
    """`a=1 b=2.5` -> {"a": 1.0, "b": 2.5}."""
    return {k: float(v) for k, _, v in (w.partition("=") for w in line.split()) if v}


def _by_reason(before: relay_pb2.RelayStats, after: relay_pb2.RelayStats) -> dict[str, float]:
    out: dict[str, float] = {}
    for reason, number in relay_pb2.DropReason.items():
        delta = drops(after, number) - drops(before, number)
        if delta:
            out["drop_" + reason.removeprefix("DROP_REASON_").lower()] = delta
    return out


def _c2t(stats: relay_pb2.RelayStats, field_name: str) -> int:
    return sum(
        getattr(t, field_name)
        for t in stats.traffic
        if t.direction == relay_pb2.DIRECTION_CLIENT_TO_TRANSCEIVER
    )


def _in_spoof_range(ip: str) -> bool:
    return ip.startswith("10.77.")


async def flood_generated(
    edge: NetEdge, pps: int, seconds: float, kind: str, *, spoof: bool, floodgen: Path = FLOODGEN
) -> Figures:
    """The C generator (tests/bench/floodgen.c) floods the relay from the third host at
    `pps` (0: as fast as it can) for `seconds`, from 64 ports of that host or (`spoof`) from
    random addresses of SPOOF_PREFIX, while a call runs. Counts: offered and received pps,
    kernel drops on the relay's public sockets, relay CPU % (of one core, all workers), the
    call's audio loss both ways, drops by reason, bindings the flood made, and how much more
    than the call's own packets the relay forwarded to the transceiver."""
    if spoof:
        spoof_route(edge)

    async def fault(pc: RTCPeerConnection, result: CallResult) -> Figures:
        username, _ = calls.ice_credentials(pc, result)
        relay_pid = edge.stack.services["relay"].process.pid
        port = edge.relay[1]
        before = relay_stats(edge)
        session_before = calls.live_session(edge).stats
        kernel_before = socket_drops(edge, "relay", port)
        argv = floodgen_argv(floodgen, edge.relay, pps, seconds, kind, username, spoof)
        cpu0, t0 = cpu_seconds(relay_pid), time.monotonic()
        process = edge.testbed.start(
            edge.testbed.ns("other"), argv, name="floodgen", stdout=subprocess.PIPE, text=True
        )
        out, _ = await asyncio.to_thread(process.communicate, None, seconds + 30)
        cpu1, t1 = cpu_seconds(relay_pid), time.monotonic()
        if process.returncode != 0:
            raise AssertionError(f"floodgen failed ({process.returncode}): {out}")
        await asyncio.sleep(0.7)  # child workers push their counters every 0.5 s
        after = relay_stats(edge)
        session_after = calls.live_session(edge).stats
        arrivals = calls.Arrivals(list(result.arrivals))
        heard = sum(1 for x in arrivals.times if t0 <= x <= t1)
        sent = parse_counts(out.strip().splitlines()[-1])
        elapsed = t1 - t0
        up_got = session_after.packets_received - session_before.packets_received
        up_lost = session_after.packets_lost - session_before.packets_lost
        flood_bound = [
            b
            for b in calls.relay_bindings(edge)
            if b[0] == edge.addresses.other or _in_spoof_range(b[0])
        ]
        counts = {
            "offered_pps": sent.get("sent", 0) / max(sent.get("seconds", elapsed), 1e-3),
            "received_pps": (_c2t(after, "packets_received") - _c2t(before, "packets_received"))
            / elapsed,
            "kernel_drops": socket_drops(edge, "relay", port) - kernel_before,
            "relay_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
            "down_loss_pct": max(0.0, 100 * (1 - heard * 0.02 / elapsed)),
            "up_loss_pct": 100 * max(0, up_lost) / max(1, up_got + max(0, up_lost)),
            # What reached the transceiver beyond the call's own packets (~100 pps with
            # RTCP and consent checks): the flood's share, which must stay 0.
            "forwarded_c2t": _c2t(after, "packets_forwarded") - _c2t(before, "packets_forwarded"),
            "call_packets_up": float(up_got),
            "heard_frames": float(heard),
            "flood_bindings": len(flood_bound),
            **_by_reason(before, after),
        }
        return Figures(arrivals.longest_gap_s(t0, t1), counts)

    return await around_call(edge, fault)
