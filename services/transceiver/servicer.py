"""TransceiverService over gRPC: thin mapping of requests onto the SessionManager."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from libs.service.aio import cancel_and_wait
from services.transceiver.manager import SessionManager
from services.transceiver.session import Session
from voiceedge.common.v1 import common_pb2
from voiceedge.transceiver.v1 import transceiver_pb2 as pb
from voiceedge.transceiver.v1 import transceiver_pb2_grpc


class TransceiverServicer(transceiver_pb2_grpc.TransceiverServiceServicer):
    def __init__(self, manager: SessionManager, default_grace_s: float) -> None:
        self._manager = manager
        self._default_grace_s = default_grace_s

    async def CreateSession(  # noqa: N802 (gRPC method name)
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        # Refusals are StatusErrors: the server's interceptor answers them.
        answer = await self._manager.create(request)
        return pb.CreateSessionResponse(answer_sdp=answer, session_id=request.session_id)

    async def CloseSession(  # noqa: N802 (gRPC method name)
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseSessionResponse:
        info = await self._manager.close(request.session_id, common_pb2.CLOSE_REASON_CLOSE_RPC)
        return pb.CloseSessionResponse(session=info)

    async def RestartIce(  # noqa: N802 (gRPC method name)
        self, request: pb.RestartIceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RestartIceResponse:
        return await self._manager.restart_ice(request)

    async def GetSession(  # noqa: N802 (gRPC method name)
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSessionResponse:
        session = self._manager.find(request.session_id)
        return pb.GetSessionResponse(session=await session.info())

    async def ListSessions(  # noqa: N802 (gRPC method name)
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSessionsResponse:
        sessions, token = await self._manager.list(request.page_size, request.page_token)
        infos = [await s.info() for s in sessions]
        return pb.ListSessionsResponse(sessions=infos, next_page_token=token)

    async def Drain(  # noqa: N802 (gRPC method name)
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DrainResponse:
        grace_s = request.grace_period_ms / 1000.0 if request.grace_period_ms else None
        active = await self._manager.drain(self._default_grace_s if grace_s is None else grace_s)
        return pb.DrainResponse(active_sessions=active)

    async def StreamSessionEvents(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.StreamSessionEventsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamSessionEventsResponse]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "session_id" or not first.session_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first request must name the session_id"
            )
        session = self._manager.find(first.session_id)
        if not isinstance(session, Session) or session.is_closed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session {first.session_id!r} ended")
        sideband = session.attach_sideband()

        async def client_events() -> None:
            async for request in request_iterator:
                if request.WhichOneof("payload") == "client_event":
                    session.client_event(request.client_event, sideband)

        reader = asyncio.get_running_loop().create_task(client_events())
        try:
            while (text := await sideband.get()) is not None:
                yield pb.StreamSessionEventsResponse(server_event=text)
        finally:
            session.detach_sideband(sideband)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await cancel_and_wait(reader)
        if sideband.behind:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the reader fell behind the session's events"
            )
