"""A container HEALTHCHECK: asks the service's own grpc.health.v1 whether it is SERVING.

    python -m libs.service.healthcheck relay

reads `VOICEEDGE_RELAY_GRPC_LISTEN` (the port the process binds; the image sets it) and
checks 127.0.0.1 on that port. Exit 0: SERVING; 1: anything else, with one line saying why.
A draining process reports NOT_SERVING, so the engine marks it unhealthy as Kubernetes
readiness would. The health service needs no internal-plane token (libs/service/auth.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def target(service: str, environ: Mapping[str, str]) -> str:
    """The loopback address of `service`'s gRPC port, from its listen setting."""
    name = f"VOICEEDGE_{service.upper()}_GRPC_LISTEN"
    listen = environ.get(name, "")
    port = listen.rpartition(":")[2]
    if not port.isdigit() or int(port) == 0:
        raise ValueError(f"{name}={listen!r}: a healthcheck needs a fixed port")
    return f"127.0.0.1:{port}"


def check(address: str, timeout_s: float = TIMEOUT_S) -> str:
    """The serving status name of the server at `address` ("SERVING", "NOT_SERVING", ...)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m libs.service.healthcheck SERVICE", file=sys.stderr)
        return 2
    try:
        address = target(args[0], os.environ)
        status = check(address)
    except (ValueError, grpc.RpcError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"healthcheck: {address} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
