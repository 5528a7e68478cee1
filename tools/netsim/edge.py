"""The standard layout with the whole edge on it: what the cross-host tests, the benchmark
and `netsim call` share.

    client --(impaired link)-- nat ---- inet ---- relay (203.0.113.10:3478, public)
                                          |         | 10.20.0.0/24 (internal)
                                          +---- cluster (203.0.113.130:8080 HTTP;
                                          |       geosteer, bridge, transceiver, Redis,
                                          |       signaling gRPC on 10.20.0.2)
                                        other (192.0.2.2: forged and replayed packets)

Every service is the Bazel binary started with `ip netns exec` (tools/demo/stack.py); the
relay listens on its public address and faces the transceivers on its internal one, the
transceiver's media socket is on the internal network only, and Redis holds the relay's
binding copy. Nothing is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from libs.service.redis_testing import Redis
from tools.demo.stack import Placement, Stack, StackConfig, start_stack
from tools.netsim import layout, nat, net
from tools.netsim.forwarder import ImpairedLink
from tools.netsim.impair import Profile

ADDR = layout.StandardAddresses()
RELAY_PORT = 3478
RELAY_TCP_PORT = 443  # the relay's ICE-TCP port when a test asks for one
HTTP_PORT = 8080
REDIS_PORT = 6379


@dataclass
class NetEdge:
    testbed: net.Testbed
    nat: nat.Nat
    link: ImpairedLink  # client <-> nat; "up" is client -> nat
    stack: Stack
    redis: Redis
    addresses: layout.StandardAddresses = ADDR

    @property
    def http_base(self) -> str:
        return self.stack.http_base

    @property
    def relay(self) -> tuple[str, int]:
        return self.stack.relay_udp


def _with_defaults(flags: dict[str, list[str]]) -> dict[str, list[str]]:
    # The relay drains until its bindings idle out (30 s); a torn-down testbed need not.
    merged = dict(flags)
    merged["relay"] = ["--drain-grace-s", "1", *flags.get("relay", [])]
    return merged


@contextlib.contextmanager
def standard_edge(
    workdir: Path,
    api_key: str,
    *,
    nat_profile: str = "masquerade",
    up: Profile | None = None,
    down: Profile | None = None,
    extra_flags: dict[str, list[str]] | None = None,
    relay_tcp_port: int = 0,
    grpc_ports: dict[str, int] | None = None,
) -> Iterator[NetEdge]:
    """Builds the standard layout, starts the edge on it; tears everything down on exit.
    Service logs go to workdir/services.log. `relay_tcp_port`: the relay also listens for
    ICE-TCP there on its public address, and answers carry it (0: UDP only)."""
    with net.Testbed(layout.standard()) as testbed, (workdir / "services.log").open("w") as log:
        router = nat.Nat(testbed, "nat", "inet", nat_profile).apply()
        link = ImpairedLink(testbed, 0, up, down)
        cluster = Placement(testbed.ns("cluster"), ADDR.cluster_internal)
        redis = Redis(
            f"redis://{ADDR.cluster_internal}:{REDIS_PORT}/0",
            REDIS_PORT,
            None,
            ADDR.cluster_internal,
        )
        with net.entered_namespace(cluster.netns):
            redis.start()
        try:
            stack = start_stack(
                StackConfig(
                    relay_udp_port=RELAY_PORT,
                    relay_tcp_port=relay_tcp_port,
                    http_port=HTTP_PORT,
                    api_key=api_key,
                    redis_url=redis.url,
                    log=log,
                    workdir=workdir,
                    extra_flags=_with_defaults(extra_flags or {}),
                    grpc_ports=dict(grpc_ports or {}),
                    placement={
                        "geosteer": cluster,
                        "bridge": cluster,
                        "transceiver": cluster,
                        "signaling": cluster,
                        "relay": Placement(testbed.ns("relay"), ADDR.relay_internal),
                    },
                    relay_public_host=ADDR.relay_public,
                    http_host=ADDR.signaling_public,
                )
            )
            try:
                yield NetEdge(testbed, router, link, stack, redis)
            finally:
                stack.stop()
        finally:
            redis.stop()
