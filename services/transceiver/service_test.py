"""The transceiver process: usage, bad settings, health and reflection over real gRPC, drain."""

from __future__ import annotations

import queue
import signal
import time
import urllib.request
from concurrent import futures
from typing import Any

import grpc
import pytest

from libs.service.testing import assert_service_lifecycle, binary, run_cli, running_service
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

COMMAND = binary("services/transceiver")


def test_help_lists_settings() -> None:
    result = run_cli(COMMAND, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--grpc-listen" in result.stdout
    assert "VOICEEDGE_TRANSCEIVER_" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grpc-listen", "nowhere"], "grpc_listen: expected host:port"),
        (
            ["--opus-application", "music"],
            "opus_application: expected one of voip, audio, lowdelay",
        ),
        (["--opus-complexity", "11"], "opus_complexity: must be 0 to 10"),
        (["--consent-expiry-s", "0"], "consent_expiry_s: must be > 0"),
    ],
)
def test_bad_setting_is_a_clear_error(args: list[str], message: str) -> None:
    result = run_cli(COMMAND, args)
    assert result.returncode == 2
    assert message in result.stderr


def test_serves_health_and_reflection_then_drains() -> None:
    assert_service_lifecycle(
        COMMAND, "voiceedge.transceiver.v1.TransceiverService", ["--media-listen", "127.0.0.1:0"]
    )


class RecordingGeosteer(geosteer_pb2_grpc.GeosteerServiceServicer):
    """A synchronous in-test geosteer: records what the transceiver process reports."""

    def __init__(self) -> None:
        self.nodes: queue.Queue[geosteer_pb2.Node] = queue.Queue()
        self.beats: queue.Queue[geosteer_pb2.HeartbeatRequest] = queue.Queue()

    def RegisterNode(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.RegisterNodeRequest, context: Any
    ) -> geosteer_pb2.RegisterNodeResponse:
        self.nodes.put(request.node)
        return geosteer_pb2.RegisterNodeResponse(heartbeat_interval_ms=50, heartbeat_ttl_ms=500)

    def Heartbeat(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.HeartbeatRequest, context: Any
    ) -> geosteer_pb2.HeartbeatResponse:
        self.beats.put(request)
        return geosteer_pb2.HeartbeatResponse(known=True)

    def DeregisterNode(  # noqa: N802 (gRPC method name)
        self, request: geosteer_pb2.DeregisterNodeRequest, context: Any
    ) -> geosteer_pb2.DeregisterNodeResponse:
        return geosteer_pb2.DeregisterNodeResponse(removed=True)


def test_registers_with_geosteer_and_reports_draining() -> None:
    geosteer = RecordingGeosteer()  # type: ignore[abstract]  # only the node RPCs
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server(geosteer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # A gRPC server where the bridge should be: a transceiver that cannot reach its bridge
    # reports itself as taking no new calls (draining).
    bridge = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    bridge_port = bridge.add_insecure_port("127.0.0.1:0")
    bridge.start()
    args = [
        "--media-listen",
        "127.0.0.1:0",
        "--bridge-address",
        f"127.0.0.1:{bridge_port}",
        "--geosteer-address",
        f"127.0.0.1:{port}",
        "--cluster-id",
        "7",
        "--transceiver-id",
        "42",
        "--max-sessions",
        "5",
        "--drain-grace-s",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    try:
        with running_service(COMMAND, args) as service:
            node = geosteer.nodes.get(timeout=30)
            assert node.kind == common_pb2.NODE_KIND_TRANSCEIVER
            assert (node.cluster_id, node.transceiver_id) == (7, 42)
            assert node.node_id == "transceiver-7-42"
            assert f"{node.media_address.ip}:{node.media_address.port}" == service.ready["media"]
            assert node.capacity_sessions == 5
            beat = geosteer.beats.get(timeout=30)
            assert not beat.draining
            url = f"http://{service.ready['metrics']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                exposition = response.read().decode()
            assert "voiceedge_transceiver_sessions_active" in exposition
            service.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not geosteer.beats.get(timeout=30).draining:
                assert time.monotonic() < deadline, "no draining heartbeat"
            _, err = service.process.communicate(timeout=60)
            assert service.process.returncode == 0, err
    finally:
        server.stop(0)
        bridge.stop(0)
