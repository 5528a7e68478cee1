"""The bridge process: usage, bad settings, health and reflection over real gRPC, drain."""

from __future__ import annotations

from libs.service.testing import assert_service_lifecycle, binary, run_cli

COMMAND = binary("services/bridge")


def test_help_lists_settings() -> None:
    result = run_cli(COMMAND, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--grpc-listen" in result.stdout
    assert "VOICEEDGE_BRIDGE_" in result.stdout


def test_bad_setting_is_a_clear_error() -> None:
    result = run_cli(COMMAND, ["--grpc-listen", "nowhere"])
    assert result.returncode == 2
    assert "grpc_listen: expected host:port" in result.stderr


def test_serves_health_and_reflection_then_drains() -> None:
    assert_service_lifecycle(COMMAND, "voiceedge.inference.v1.InferenceBridgeService")


def test_realtime_backend_needs_a_url() -> None:
    result = run_cli(COMMAND, ["--backend", "realtime"])
    assert result.returncode == 2
    assert "realtime_url: required" in result.stderr
    result = run_cli(COMMAND, ["--backend", "llm"])
    assert result.returncode == 2
    assert "backend: expected one of echo, realtime, pipecat" in result.stderr


def test_a_pipecat_factory_that_cannot_load_stops_the_bridge_at_start_up() -> None:
    result = run_cli(COMMAND, ["--backend", "pipecat", "--pipecat-factory", "nowhere.agent:build"])
    assert result.returncode == 2, result.stderr
    assert "pipecat_factory" in result.stderr
    assert "nowhere" in result.stderr


def test_the_listen_backend_loads_its_model_before_ready_and_drains() -> None:
    assert_service_lifecycle(
        COMMAND, "voiceedge.inference.v1.InferenceBridgeService", ["--backend", "listen"]
    )


def test_a_listen_voice_espeak_ng_lacks_stops_the_bridge_at_start_up() -> None:
    result = run_cli(COMMAND, ["--backend", "listen", "--listen-voice", "nosuchvoice"])
    assert result.returncode == 2, result.stderr
    assert "listen_voice" in result.stderr
