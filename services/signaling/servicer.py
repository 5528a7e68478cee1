"""SignalingService on gRPC: the server-side mirror of the HTTP API over CallService."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from libs.service.aio import timestamp
from services.signaling.calls import CallService, Principal, struct_to_dict
from services.signaling.store import CALL_CONNECTED, CALL_CONNECTING, CALL_ENDED, CallRecord
from voiceedge.signaling.v1 import signaling_pb2, signaling_pb2_grpc

T = TypeVar("T")


_CALL_STATES = {
    CALL_CONNECTING: signaling_pb2.CALL_STATE_CONNECTING,
    CALL_CONNECTED: signaling_pb2.CALL_STATE_CONNECTED,
    CALL_ENDED: signaling_pb2.CALL_STATE_ENDED,
}


def call_message(call: CallRecord) -> signaling_pb2.Call:
    message = signaling_pb2.Call(
        call_id=call.call_id,
        cluster_id=call.cluster_id,
        transceiver_node_id=call.transceiver_node_id,
        session_id=call.session_id,
        created_at=timestamp(call.created_at),
        state=_CALL_STATES.get(call.state, signaling_pb2.CALL_STATE_CONNECTING),
        close_reason=call.close_reason,  # type: ignore[arg-type,unused-ignore]
    )
    if call.ended_at:
        message.ended_at.CopyFrom(timestamp(call.ended_at))
    return message


class SignalingServicer(signaling_pb2_grpc.SignalingServiceServicer):
    def __init__(self, service: CallService) -> None:
        self._service = service

    async def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        raw = metadata.get("authorization")
        authorization = raw.decode() if isinstance(raw, bytes) else raw
        principal = await self._service.authenticate(authorization)
        self._service.check_key_rate(principal)
        return principal

    async def _as_caller(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        action: Callable[[Principal], Awaitable[T]],
    ) -> T:
        """Authenticates the caller from the metadata and runs `action` as them; a refusal is
        a StatusError, which the server's interceptor turns into the gRPC status and the
        `error-code`/`retry-after` trailers."""
        principal = await self._principal(context)
        return await action(principal)

    async def CreateCall(  # noqa: N802 (gRPC method name)
        self,
        request: signaling_pb2.CreateCallRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> signaling_pb2.CreateCallResponse:
        session = struct_to_dict(request.session) if request.HasField("session") else None
        created = await self._as_caller(
            context,
            lambda principal: self._service.create_call(
                principal, request.offer_sdp, session, request.client_ip
            ),
        )
        return signaling_pb2.CreateCallResponse(
            call_id=created.call.call_id,
            answer_sdp=created.answer_sdp,
            call=call_message(created.call),
        )

    async def GetCall(  # noqa: N802 (gRPC method name)
        self, request: signaling_pb2.GetCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> signaling_pb2.GetCallResponse:
        call = await self._as_caller(
            context, lambda principal: self._service.get_call(principal, request.call_id)
        )
        return signaling_pb2.GetCallResponse(call=call_message(call))

    async def DeleteCall(  # noqa: N802 (gRPC method name)
        self,
        request: signaling_pb2.DeleteCallRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> signaling_pb2.DeleteCallResponse:
        call = await self._as_caller(
            context, lambda principal: self._service.delete_call(principal, request.call_id)
        )
        return signaling_pb2.DeleteCallResponse(call=call_message(call))

    async def CreateClientSecret(  # noqa: N802 (gRPC method name)
        self,
        request: signaling_pb2.CreateClientSecretRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> signaling_pb2.CreateClientSecretResponse:
        session = struct_to_dict(request.session) if request.HasField("session") else None
        secret = await self._as_caller(
            context,
            lambda principal: self._service.create_client_secret(
                principal, request.expires_after_s, session
            ),
        )
        response = signaling_pb2.CreateClientSecretResponse(
            value=secret.value, expires_at=timestamp(secret.expires_at)
        )
        response.session.update(secret.session)
        return response
