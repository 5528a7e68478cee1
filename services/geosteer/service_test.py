"""The geosteer process: usage, bad settings, health and reflection over real gRPC, drain."""

from __future__ import annotations

import signal
import time

from grpc_health.v1 import health_pb2

from libs.service.redis_testing import redis_server
from libs.service.testing import (
    assert_service_lifecycle,
    binary,
    health_status,
    run_cli,
    running_service,
)

COMMAND = binary("services/geosteer")
SERVICE = "voiceedge.geosteer.v1.GeosteerService"


def test_help_lists_settings() -> None:
    result = run_cli(COMMAND, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--grpc-listen" in result.stdout
    assert "VOICEEDGE_GEOSTEER_" in result.stdout


def test_bad_setting_is_a_clear_error() -> None:
    result = run_cli(COMMAND, ["--grpc-listen", "nowhere"])
    assert result.returncode == 2
    assert "grpc_listen: expected host:port" in result.stderr


def test_serves_health_and_reflection_then_drains() -> None:
    assert_service_lifecycle(COMMAND, SERVICE)


def test_bad_topology_is_a_clear_error() -> None:
    result = run_cli(COMMAND, ["--topology-path", "/nonexistent/topology.toml"])
    assert result.returncode == 2
    assert "topology_path: topology file /nonexistent/topology.toml" in result.stderr


def wait_health(address: str, want: int, timeout_s: float = 30.0) -> None:
    """Polls grpc.health.v1 ("" and the service) until both say `want` (bounded)."""
    deadline = time.monotonic() + timeout_s
    seen: tuple[int, int] = (-1, -1)
    while time.monotonic() < deadline:
        seen = (health_status(address), health_status(address, SERVICE))
        if seen == (want, want):
            return
        time.sleep(0.05)
    raise AssertionError(f"health stayed {seen}, wanted {want}")


def test_health_says_not_serving_while_the_redis_registry_is_unreachable() -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with redis_server() as redis:
        args = [
            "--redis-url",
            redis.url,
            "--redis-timeout-s",
            "0.5",
            "--heartbeat-interval-ms",
            "200",
            "--heartbeat-ttl-ms",
            "1000",
        ]
        with running_service(COMMAND, args) as service:
            wait_health(service.grpc_address, serving)
            redis.stop()  # SIGKILL by PID
            wait_health(service.grpc_address, not_serving)
            redis.start()  # same port: the next sweep answers
            wait_health(service.grpc_address, serving)
            service.process.send_signal(signal.SIGTERM)
            _, err = service.process.communicate(timeout=60)
            assert service.process.returncode == 0, err
            assert "event=registry.unreachable" in err
            assert "event=registry.reachable" in err
