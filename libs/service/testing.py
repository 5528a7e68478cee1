"""Test helpers: start a real service process on 127.0.0.1:0 and talk to it over gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from libs.service.readiness import wait_for_ready

# Not resolve(): runfiles are symlinks into the source tree, and the child must import the
# runfiles copy (generated protos live only there).
WORKSPACE = Path(os.path.abspath(__file__)).parents[2]


@dataclass
class RunningService:
    process: subprocess.Popen[str]
    ready: dict[str, Any]

    @property
    def grpc_address(self) -> str:
        return str(self.ready["grpc"])


def binary(package: str, name: str | None = None) -> list[str]:
    """The command of a py_binary in the test's data, e.g. binary("services/relay")."""
    path = WORKSPACE / package / (name or package.rsplit("/", 1)[-1])
    if not path.exists():
        raise AssertionError(f"{path} missing: add the binary to the test's data")
    return [str(path)]


def read_ready_line(process: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """The JSON ready line, or fail with what the process said on stderr."""
    ready = wait_for_ready(process, timeout_s)
    if ready is not None:
        return ready
    process.kill()
    _, err = process.communicate(timeout=10)
    raise AssertionError(f"service never became ready (rc={process.returncode}):\n{err}")


@contextmanager
def running_service(
    command: Sequence[str],
    args: Sequence[str] = (),
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> Iterator[RunningService]:
    """Runs `command --grpc-listen 127.0.0.1:0 args`, yields once it printed its ready line,
    and always reaps it."""
    process = subprocess.Popen(
        [*command, "--grpc-listen", "127.0.0.1:0", *args],
        cwd=WORKSPACE,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield RunningService(process, read_ready_line(process, timeout_s))
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(response.status)


def reflected_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), timeout=10)
        return {s.name for r in responses for s in r.list_services_response.service}


def assert_service_lifecycle(
    command: Sequence[str], full_name: str, args: Sequence[str] = ()
) -> None:
    """The standard skeleton contract: ready line, health SERVING for the service, reflection
    lists it, SIGTERM drains and exits 0."""
    with running_service(command, args) as service:
        assert health_status(service.grpc_address) == health_pb2.HealthCheckResponse.SERVING
        assert (
            health_status(service.grpc_address, full_name) == health_pb2.HealthCheckResponse.SERVING
        )
        assert full_name in reflected_services(service.grpc_address)
        service.process.send_signal(signal.SIGTERM)
        _, err = service.process.communicate(timeout=60)
        assert service.process.returncode == 0, err
        assert "event=service.draining" in err
        assert "event=service.stopped" in err


def run_cli(
    command: Sequence[str], args: Sequence[str], timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        cwd=WORKSPACE,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
