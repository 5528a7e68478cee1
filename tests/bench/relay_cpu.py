"""Relay data-plane CPU cost per packet, A/B against another version of services/relay:
`./bazelw run //tests/bench:relay_cpu -- --reference-tree DIR`.

The throughput benchmark (relay_bench.py) measures packets per second through the real
binary, which on a shared, loaded machine mostly measures the neighbours. This one drives
the batched I/O handlers of `DataPlane` (the code between recvmmsg and sendmmsg: routing,
counting, batching by socket) over prepared 64-datagram batches, with a stand-in for the
native extension that hands out the batches and "sends" everything, and reads the thread's
CPU time (CLOCK_THREAD_CPUTIME_ID: time while descheduled does not count). The two versions
run in separate processes, alternated round by round, so a busy moment hits both alike.

DIR holds the reference's `services/relay` (e.g. `git archive <commit> services/relay | tar
-x -C DIR`); everything else (libs, generated protos) is this build's. Directions: client ->
transceiver (SRTP, bound clients, one public socket) and transceiver -> client with one and
with two public sockets (clients spread over both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

BATCH = 64
CLIENTS = 64
SRTP = bytes([0x80, 0x6F]) + bytes(198)  # 200 bytes, as in relay_bench
MEDIA = ("10.0.0.1", 40000)


class BatchSource:
    """Stands in for libs/fastio: every recv returns the same prepared batch."""

    def __init__(self, batches: dict[int, list[tuple[bytes, tuple[str, int]]]]) -> None:
        self.batches = batches
        self.sent = 0

    def recv_batch(self, fd: int, max_count: int) -> list[tuple[bytes, tuple[str, int]]]:
        return self.batches[fd]

    def send_batch(self, fd: int, items: list[Any]) -> int:
        self.sent += len(items)
        return len(items)


def child(calls: int, sockets: int) -> dict[str, float]:
    """ns of thread CPU time per packet, per direction, for the services.relay on sys.path."""
    from libs.wire import framing, ufrag
    from services.relay.dataplane import MAX_ROUNDS, DataPlane
    from services.relay.router import Router, binding_request_for
    from services.relay.store import MemoryBindingStore
    from services.relay.topology import static_view

    keyring = ufrag.dev_keyring()
    router = Router(keyring, static_view([f"1/1={MEDIA[0]}:{MEDIA[1]}"]))
    plane = DataPlane(
        router,
        MemoryBindingStore(),
        udp_listen=tuple(f"127.0.0.1:{i + 1}" for i in range(sockets)),
        internal_listen="127.0.0.1:0",
        binding_ttl_s=30.0,
        redis_max_inflight=1,
        batched_io=False,
    )
    clients = [(f"10.1.0.{i + 1}", 50000 + i) for i in range(CLIENTS)]
    for i, client in enumerate(clients):
        router.route_client_packet(binding_request_for(keyring, 1, 1)[0], client, 0.0, i % sockets)
    assert len(router) == CLIENTS
    internal_fd = 100
    public = {fd: [(SRTP, c) for c in clients[:BATCH]] for fd in range(sockets)}
    replies = [(framing.encode(c[0], c[1], SRTP), MEDIA) for c in clients[:BATCH]]
    source = BatchSource({**public, internal_fd: replies})
    plane._fastio = source
    plane._public_fds = list(range(sockets))
    plane._internal_fd = internal_fd
    packets = calls * MAX_ROUNDS * BATCH
    out: dict[str, float] = {}
    handlers: tuple[tuple[str, Callable[[], None]], ...] = (
        ("c2t", lambda: plane._public_readable(0, 0)),
        ("t2c", plane._internal_readable),
    )
    for name, run in handlers:
        run()  # warm up
        source.sent = 0
        start = time.thread_time_ns()
        for _ in range(calls):
            run()
        out[name] = (time.thread_time_ns() - start) / packets
        assert source.sent == packets, (name, source.sent, packets)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference-tree", required=True, help="dir holding services/relay")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300, help="handler calls per measurement")
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--sockets", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import services.relay.dataplane

        figures: dict[str, Any] = dict(child(args.calls, args.sockets))
        figures["source"] = services.relay.dataplane.__file__
        print(json.dumps(figures))
        return 0
    tree = os.path.abspath(args.reference_tree)
    if not os.path.exists(os.path.join(tree, "services", "relay", "router.py")):
        raise SystemExit(f"no services/relay/router.py under {tree}")
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for version in ("reference", "ours"):
            for sockets in (1, 2):
                env = dict(os.environ)
                if version == "reference":
                    # Namespace packages: the first services/relay on the path wins per module.
                    env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
                command = [sys.executable, os.path.abspath(__file__), "--reference-tree", tree]
                command += ["--child", version, "--calls", str(args.calls)]
                command += ["--sockets", str(sockets)]
                line = (
                    subprocess.run(
                        command, env=env, capture_output=True, text=True, check=True, timeout=300
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                results.setdefault((version, sockets), []).append(json.loads(line))
    for version in ("reference", "ours"):
        print(f"{version}: {results[(version, 1)][0]['source']}")
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} alternating rounds; ns/packet")
    header = f"{'reference min':>14}{'ours min':>10}{'ratio':>7}{'ref median':>12}{'ours med':>10}"
    print(f"{'':34}{header}")
    for direction, sockets in (("c2t", 1), ("t2c", 1), ("t2c", 2)):
        ref = [r[direction] for r in results[("reference", sockets)]]
        ours = [r[direction] for r in results[("ours", sockets)]]
        label = f"{direction}, {sockets} public socket(s)"
        print(
            f"{label:34}{min(ref):>14.0f}{min(ours):>10.0f}{min(ours) / min(ref):>7.2f}"
            f"{statistics.median(ref):>12.0f}{statistics.median(ours):>10.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
