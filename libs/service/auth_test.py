"""The internal plane's token: refused without it (unary and streaming), served with it,
health checks open to probes, unusable tokens refused at start-up with a reason."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.config.settings import ServiceSettings
from libs.service.auth import internal_channel
from libs.service.runtime import GrpcService, Servicer, service_main
from libs.service.tokens import TOKEN_ENV, TokenError, check_secret, parse_token
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc
from voiceedge.transceiver.v1 import transceiver_pb2, transceiver_pb2_grpc

TOKEN = secrets.token_hex(24)


T = TypeVar("T")


def _unimplemented(base: Callable[[], T]) -> T:
    """The generated servicer base, which answers UNIMPLEMENTED to every RPC (its stubs
    mark it abstract, hence the factory type)."""
    return base()


def _servicers() -> list[Servicer]:
    # The generated bases answer UNIMPLEMENTED: a call that gets that far passed the check.
    return [
        Servicer(
            "voiceedge.geosteer.v1.GeosteerService",
            geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server,
            _unimplemented(geosteer_pb2_grpc.GeosteerServiceServicer),
        ),
        Servicer(
            "voiceedge.transceiver.v1.TransceiverService",
            transceiver_pb2_grpc.add_TransceiverServiceServicer_to_server,
            _unimplemented(transceiver_pb2_grpc.TransceiverServiceServicer),
        ),
        Servicer(
            "voiceedge.relay.v1.RelayAdminService",
            relay_pb2_grpc.add_RelayAdminServiceServicer_to_server,
            _unimplemented(relay_pb2_grpc.RelayAdminServiceServicer),
        ),
        Servicer(
            "voiceedge.inference.v1.InferenceBridgeService",
            inference_pb2_grpc.add_InferenceBridgeServiceServicer_to_server,
            _unimplemented(inference_pb2_grpc.InferenceBridgeServiceServicer),
        ),
    ]


async def _codes(channel: grpc.aio.Channel) -> dict[str, grpc.StatusCode]:
    """The status of each protected RPC the issue names, and of each streaming kind."""
    geosteer = geosteer_pb2_grpc.GeosteerServiceStub(channel)
    transceiver = transceiver_pb2_grpc.TransceiverServiceStub(channel)
    relay = relay_pb2_grpc.RelayAdminServiceStub(channel)
    bridge = inference_pb2_grpc.InferenceBridgeServiceStub(channel)
    calls: dict[str, Awaitable[Any]] = {
        "RegisterNode": geosteer.RegisterNode(geosteer_pb2.RegisterNodeRequest(), timeout=5),
        "CreateSession": transceiver.CreateSession(
            transceiver_pb2.CreateSessionRequest(), timeout=5
        ),
        "Drain(transceiver)": transceiver.Drain(transceiver_pb2.DrainRequest(), timeout=5),
        "Drain(relay)": relay.Drain(relay_pb2.DrainRequest(), timeout=5),
        "ListBindings": relay.ListBindings(relay_pb2.ListBindingsRequest(), timeout=5),
    }
    codes: dict[str, grpc.StatusCode] = {}
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        codes[name] = caught.value.code()
    watch = geosteer.WatchTopology(geosteer_pb2.WatchTopologyRequest(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in watch:
            pass
    codes["WatchTopology"] = caught.value.code()
    stream = bridge.StreamSession(iter([inference_pb2.StreamSessionRequest()]), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    codes["StreamSession"] = caught.value.code()
    return codes


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    return int(reply.status)


async def test_calls_without_the_token_are_refused_and_with_it_served() -> None:
    service = GrpcService("unit", "127.0.0.1:0", _servicers(), token=TOKEN)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as bare:
            refused = await _codes(bare)
            # Probes carry no token: health stays open.
            assert await _health(bare) == health_pb2.HealthCheckResponse.SERVING
        assert set(refused.values()) == {grpc.StatusCode.UNAUTHENTICATED}, refused

        wrong = {TOKEN_ENV: secrets.token_hex(24)}  # another token, as good as the right one
        async with internal_channel(service.address, environ=wrong) as channel:
            assert set((await _codes(channel)).values()) == {grpc.StatusCode.UNAUTHENTICATED}

        right = {TOKEN_ENV: TOKEN}
        async with internal_channel(service.address, environ=right) as channel:
            served = await _codes(channel)
        assert set(served.values()) == {grpc.StatusCode.UNIMPLEMENTED}, served
    finally:
        await service.close()


async def test_without_a_token_the_plane_is_open_as_in_the_dev_demo() -> None:
    service = GrpcService("unit", "127.0.0.1:0", _servicers())
    await service.start()
    try:
        async with internal_channel(service.address, environ={}) as channel:
            served = await _codes(channel)
        assert set(served.values()) == {grpc.StatusCode.UNIMPLEMENTED}, served
    finally:
        await service.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short", "5 characters, need at least 32"),
        ("REPLACE_WITH_THE_OUTPUT_OF_openssl_rand_hex_32", "placeholder"),
        ("changeme-changeme-changeme-changeme", "placeholder"),
        ("a" * 40, "placeholder"),
        ("4f1c0d9a7be24e0c 8d6f3a2b1c0e9f8d7a6b5c4d", "whitespace"),
    ],
)
def test_unusable_tokens_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        parse_token(text)


def test_a_placeholder_api_key_is_refused_by_name() -> None:
    with pytest.raises(TokenError, match="VOICEEDGE_API_KEY: is a placeholder"):
        check_secret("VOICEEDGE_API_KEY", "REPLACE_WITH_YOUR_API_KEY")
    check_secret("VOICEEDGE_API_KEY", "sk-" + secrets.token_hex(24))


def test_an_empty_token_means_no_token() -> None:
    assert parse_token("") == ""
    assert parse_token(f" {TOKEN}\n") == TOKEN  # a Secret file's trailing newline


def test_a_process_with_a_placeholder_token_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "REPLACE_ME_WITH_A_REAL_TOKEN_OF_32_CHARS")

    async def never(settings: ServiceSettings, telemetry: object) -> object:
        raise AssertionError("must not start")

    code = service_main(
        [],
        name="unit",
        settings_cls=ServiceSettings,
        description="",
        build=never,  # type: ignore[arg-type]
    )
    assert code == 2
    assert "VOICEEDGE_INTERNAL_TOKEN: is a placeholder" in capsys.readouterr().err
