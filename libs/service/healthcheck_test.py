"""The image HEALTHCHECK: SERVING exits 0, a draining process 1, a port it cannot know 1."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from libs.service import healthcheck
from libs.service.runtime import GrpcService

TOKEN = secrets.token_hex(24)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("0.0.0.0:50054", "127.0.0.1:50054"), ("[::]:50051", "127.0.0.1:50051")],
)
def test_target_is_the_loopback_side_of_the_listen_setting(listen: str, expected: str) -> None:
    assert healthcheck.target("relay", {"VOICEEDGE_RELAY_GRPC_LISTEN": listen}) == expected


@pytest.mark.parametrize("environ", [{}, {"VOICEEDGE_RELAY_GRPC_LISTEN": "127.0.0.1:0"}])
def test_a_port_the_check_cannot_know_is_an_error(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="fixed port"):
        healthcheck.target("relay", environ)


async def test_serving_then_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the internal token on: health checks need none.
    service = GrpcService("unit", "127.0.0.1:0", [], token=TOKEN)
    await service.start()
    try:
        monkeypatch.setenv("VOICEEDGE_UNIT_GRPC_LISTEN", f"0.0.0.0:{service.port}")
        assert await _main_in_thread() == 0
        await service.set_serving(False)
        assert await _main_in_thread() == 1
    finally:
        await service.close()


async def _main_in_thread() -> int:
    # The check is a blocking client: run it off the loop that serves.
    return await asyncio.to_thread(healthcheck.main, ["unit"])
