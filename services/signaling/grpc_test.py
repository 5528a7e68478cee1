"""SignalingService over real gRPC: the same flow as HTTP, with status code mapping."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from libs.wire import ufrag
from services.signaling.signaling_testing import (
    API_KEY,
    CHROME_OFFER,
    fake_cluster,
    running_signaling,
)
from voiceedge.signaling.v1 import signaling_pb2, signaling_pb2_grpc

METADATA = (("authorization", f"Bearer {API_KEY}"),)


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def test_grpc_mirror() -> None:
    async with (
        fake_cluster() as cluster,
        running_signaling(cluster.geosteer_address, [API_KEY]) as signaling,
        grpc.aio.insecure_channel(signaling.grpc_address) as channel,
    ):
        stub = signaling_pb2_grpc.SignalingServiceStub(channel)
        request = signaling_pb2.CreateCallRequest(offer_sdp=CHROME_OFFER, client_ip="203.0.113.5")
        request.session.update({"voice": "marin"})
        created = await stub.CreateCall(request, metadata=METADATA)
        assert created.call_id.startswith("rtc_")
        assert created.call.cluster_id == 7
        assert created.call.transceiver_node_id == "transceiver-0"
        assert created.call.state == signaling_pb2.CALL_STATE_CONNECTING
        assert cluster.geosteer.requests[0].client_ip == "203.0.113.5"
        assert "a=ice-ufrag:" in created.answer_sdp
        session = cluster.transceivers[0].sessions[created.call_id]
        assert ufrag.decode(session.ice_ufrag, ufrag.dev_keyring()).transceiver_id == 40
        assert session.options.session_config["voice"] == "marin"

        got = await stub.GetCall(
            signaling_pb2.GetCallRequest(call_id=created.call_id), metadata=METADATA
        )
        assert got.call.call_id == created.call_id
        deleted = await stub.DeleteCall(
            signaling_pb2.DeleteCallRequest(call_id=created.call_id), metadata=METADATA
        )
        assert deleted.call.state == signaling_pb2.CALL_STATE_ENDED
        assert deleted.call.HasField("ended_at")
        assert cluster.transceivers[0].closed == [created.call_id]

        secret = await stub.CreateClientSecret(
            signaling_pb2.CreateClientSecretRequest(expires_after_s=60), metadata=METADATA
        )
        assert secret.value.startswith("ek_")
        ek_metadata = (("authorization", f"Bearer {secret.value}"),)
        created = await stub.CreateCall(
            signaling_pb2.CreateCallRequest(offer_sdp=CHROME_OFFER), metadata=ek_metadata
        )
        assert created.call_id

        # Status mapping.
        assert await _code(stub.CreateCall(request)) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            await _code(stub.CreateCall(request, metadata=(("authorization", "Bearer nope"),)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            await _code(
                stub.CreateClientSecret(
                    signaling_pb2.CreateClientSecretRequest(), metadata=ek_metadata
                )
            )
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await _code(
                stub.CreateClientSecret(
                    signaling_pb2.CreateClientSecretRequest(expires_after_s=5), metadata=METADATA
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            await _code(
                stub.CreateCall(
                    signaling_pb2.CreateCallRequest(offer_sdp="garbage"), metadata=METADATA
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            await _code(
                stub.GetCall(signaling_pb2.GetCallRequest(call_id="rtc_no"), metadata=METADATA)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        for node in cluster.transceivers:
            node.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _code(stub.CreateCall(request, metadata=METADATA)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        cluster.geosteer.refuse = grpc.StatusCode.UNAVAILABLE
        assert await _code(stub.CreateCall(request, metadata=METADATA)) == (
            grpc.StatusCode.UNAVAILABLE
        )
