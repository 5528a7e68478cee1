"""Brings the whole edge up on loopback: every service as its own process, real gRPC.

`./bazelw run //:demo` starts geosteer, bridge, transceiver, relay and signaling, prints
the page URL and the dev API key, and stops every process cleanly on Ctrl-C or SIGTERM:
the first drains every service (each within its grace), a second stops them at once.
Set REDIS_URL to share state through Redis instead of the embedded in-memory store,
VOICEEDGE_API_KEY to choose the API key (otherwise one is generated and printed), and
VOICEEDGE_DEMO_BACKEND to pick the bridge's backend: `echo` (the default) plays each turn
back, `listen` recognises it offline and answers "you said: ..." (the page shows both
transcripts).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

from tools.demo.stack import StackConfig, start_stack

DEV_PORTS = {
    "geosteer": 50051,
    "transceiver": 50052,
    "signaling": 50053,
    "relay": 50054,
    "bridge": 50055,
}
# Prometheus /metrics of each service (scrape them, or import deploy/grafana/voiceedge.json).
DEV_METRICS_PORTS = {
    "geosteer": 9461,
    "transceiver": 9462,
    "signaling": 9463,
    "relay": 9464,
    "bridge": 9465,
}


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    backend = os.environ.get("VOICEEDGE_DEMO_BACKEND", "") or "echo"
    stop = threading.Event()
    force = threading.Event()

    def on_signal(*_: object) -> None:
        # The first signal drains every service; a second one stops them at once.
        (force if stop.is_set() else stop).set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    config = StackConfig(
        relay_udp_port=3478,
        http_port=8080,
        grpc_ports=DEV_PORTS,
        metrics_ports=DEV_METRICS_PORTS,
        api_key=os.environ.get("VOICEEDGE_API_KEY", ""),
        redis_url=os.environ.get("REDIS_URL", ""),
        # The page at / and its loopback-only client secrets.
        extra_flags={"signaling": ["--demo-page", "true"], "bridge": ["--backend", backend]},
    )
    print("demo: starting geosteer, bridge, transceiver, relay, signaling ...", flush=True)
    try:
        stack = start_stack(config)
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    try:
        for name, service in stack.services.items():
            print(
                f"demo: {name:<12} grpc {service.ready['grpc']}"
                f"  metrics http://{service.ready['metrics']}/metrics",
                flush=True,
            )
        print(f"demo: relay UDP     {stack.relay_udp[0]}:{stack.relay_udp[1]}")
        print(f"demo: open          {stack.http_base}/  (click Talk)")
        print(f"demo: API key       {stack.api_key}")
        store = f"redis {config.redis_url}" if config.redis_url else "in-memory"
        print(f"demo: store         {store}")
        print(f"demo: backend       {backend} (VOICEEDGE_DEMO_BACKEND: echo or listen)")
        print("demo: Ctrl-C stops every process.", flush=True)
        while not stop.wait(0.5):
            problem = stack.check_alive()
            if problem:
                print(f"demo: {problem}; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        print("demo: stopping (a second Ctrl-C stops at once)", file=sys.stderr)
        codes = stack.stop(force)
        summary = ", ".join(f"{name} {code}" for name, code in codes.items())
        print(f"demo: stopped; exit codes: {summary}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
