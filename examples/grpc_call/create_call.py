"""A server-side call through the gRPC API (voiceedge.signaling.v1.SignalingService).

Your backend holds the API key; the browser (here: an aiortc peer standing in for it) only
sends its offer to your backend, which calls CreateCall and returns the answer.

    ./bazelw run //examples/grpc_call -- --signaling 127.0.0.1:50053 --api-key "$KEY"

It creates the call, completes ICE/DTLS through the relay, reads the call back with GetCall,
and ends it with DeleteCall. Exit status 0 means every step worked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from aiortc import RTCPeerConnection, RTCSessionDescription

from examples.python_client.client import ToneTrack
from voiceedge.signaling.v1 import signaling_pb2, signaling_pb2_grpc


async def server_side_call(signaling: str, api_key: str, connect_timeout_s: float = 10.0) -> str:
    """Returns the call id after a full create -> connected -> get -> delete cycle."""
    metadata = (("authorization", f"Bearer {api_key}"),)
    pc = RTCPeerConnection()
    try:
        pc.addTrack(ToneTrack())
        pc.createDataChannel("oai-events")
        connected = asyncio.Event()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                connected.set()

        await pc.setLocalDescription(await pc.createOffer())
        async with grpc.aio.insecure_channel(signaling) as channel:
            # grpc-stubs type generated stubs as synchronous; on an aio channel they are not.
            stub: Any = signaling_pb2_grpc.SignalingServiceStub(channel)
            created = await stub.CreateCall(
                signaling_pb2.CreateCallRequest(offer_sdp=pc.localDescription.sdp),
                metadata=metadata,
                timeout=10,
            )
            print(f"created {created.call_id} on cluster {created.call.cluster_id}")
            await pc.setRemoteDescription(
                RTCSessionDescription(sdp=created.answer_sdp, type="answer")
            )
            await asyncio.wait_for(connected.wait(), connect_timeout_s)
            print("connected through the relay")
            got = await stub.GetCall(
                signaling_pb2.GetCallRequest(call_id=created.call_id), metadata=metadata, timeout=5
            )
            print(f"state {signaling_pb2.CallState.Name(got.call.state)}")
            await stub.DeleteCall(
                signaling_pb2.DeleteCallRequest(call_id=created.call_id),
                metadata=metadata,
                timeout=5,
            )
            print("deleted")
            return str(created.call_id)
    finally:
        await pc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--signaling", default="127.0.0.1:50053", help="signaling gRPC host:port")
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(server_side_call(args.signaling, args.api_key))
    except grpc.aio.AioRpcError as exc:
        print(f"call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("call failed: not connected in time", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
