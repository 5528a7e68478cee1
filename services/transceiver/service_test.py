"""The transceiver process: usage, bad settings, health and reflection over real gRPC, drain."""

from __future__ import annotations

from libs.service.testing import assert_service_lifecycle, binary, run_cli

COMMAND = binary("services/transceiver")


def test_help_lists_settings() -> None:
    result = run_cli(COMMAND, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--grpc-listen" in result.stdout
    assert "VOICEEDGE_TRANSCEIVER_" in result.stdout


def test_bad_setting_is_a_clear_error() -> None:
    result = run_cli(COMMAND, ["--grpc-listen", "nowhere"])
    assert result.returncode == 2
    assert "grpc_listen: expected host:port" in result.stderr


def test_serves_health_and_reflection_then_drains() -> None:
    assert_service_lifecycle(
        COMMAND, "voiceedge.transceiver.v1.TransceiverService", ["--media-listen", "127.0.0.1:0"]
    )
