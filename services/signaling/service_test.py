"""The signaling process: usage, bad settings, health and reflection over real gRPC, drain,
and the HTTP listener with its generated dev key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from libs.service.testing import assert_service_lifecycle, binary, run_cli, running_service

COMMAND = binary("services/signaling")
ARGS = ["--http-listen", "127.0.0.1:0", "--geosteer-address", "127.0.0.1:1"]


def test_help_lists_settings() -> None:
    result = run_cli(COMMAND, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--grpc-listen" in result.stdout
    assert "--http-listen" in result.stdout
    assert "VOICEEDGE_SIGNALING_" in result.stdout


def test_bad_setting_is_a_clear_error() -> None:
    result = run_cli(COMMAND, ["--grpc-listen", "nowhere"])
    assert result.returncode == 2
    assert "grpc_listen: expected host:port" in result.stderr
    result = run_cli(COMMAND, ["--ufrag-keys", "1:00"])
    assert result.returncode == 2
    assert "ufrag_keys:" in result.stderr


def test_serves_health_and_reflection_then_drains() -> None:
    assert_service_lifecycle(COMMAND, "voiceedge.signaling.v1.SignalingService", ARGS)


def test_http_listener_and_generated_dev_key() -> None:
    with running_service(COMMAND, ARGS, env={"VOICEEDGE_API_KEY": ""}) as service:
        http = service.ready["http"]
        key = service.ready["dev_api_key"]
        assert key.startswith("sk-voiceedge-dev-")
        request = urllib.request.Request(
            f"http://{http}/v1/realtime/client_secrets",
            data=b"{}",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert json.loads(response.read())["value"].startswith("ek_")
        request = urllib.request.Request(
            f"http://{http}/v1/realtime/calls",
            data=b"v=0",
            headers={"Authorization": "Bearer wrong-key", "Content-Type": "application/sdp"},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310 (http://127.0.0.1 only)
        assert caught.value.code == 401
        assert json.loads(caught.value.read())["error"]["code"] == "invalid_api_key"


def test_configured_api_key_is_not_printed() -> None:
    with running_service(
        COMMAND, ARGS, env={"VOICEEDGE_API_KEY": "sk-configured-0123456789"}
    ) as service:
        assert "dev_api_key" not in service.ready


def test_demo_page_and_its_client_secrets() -> None:
    env = {"VOICEEDGE_API_KEY": "sk-configured-0123456789"}
    with running_service(COMMAND, [*ARGS, "--demo-page", "true"], env=env) as service:
        http = service.ready["http"]
        with urllib.request.urlopen(f"http://{http}/", timeout=10) as response:
            page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
        assert "/v1/realtime/calls" in page
        assert "/demo/client_secret" in page
        request = urllib.request.Request(f"http://{http}/demo/client_secret", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert json.loads(response.read())["value"].startswith("ek_")


def test_demo_page_is_off_by_default() -> None:
    with running_service(COMMAND, ARGS) as service:
        http = service.ready["http"]
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{http}/", timeout=10)
        assert caught.value.code == 404
        request = urllib.request.Request(f"http://{http}/demo/client_secret", method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310
        assert caught.value.code in (404, 405)
