"""The stock reference for the saturation benchmark: aiortc's echo pattern as in its
examples/server (one RTCPeerConnection per session answering the offer directly, the caller's
track added back with `pc.addTrack`, so aiortc decodes, resamples and re-encodes), one UDP
port per session (a 127.0.0.1 host candidate; aioice gathers none on loopback), no relay,
no bridge, stock aiortc audio level.

Signaling is one JSON object per line: {"offer": SDP} on stdin -> {"answer": SDP} on stdout;
{"close": true} closes every session and exits. Prints {"ready": true} first.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from services.transceiver import aiortc_compat


async def answer(offer_sdp: str, pcs: list[RTCPeerConnection]) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pcs.append(pc)

    def on_track(track: MediaStreamTrack) -> None:
        pc.addTrack(track)  # echo: aiortc decodes the caller and encodes it back

    pc.on("track", on_track)
    await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
    await aiortc_compat.let_early_connect_return(pc)
    await aiortc_compat.add_loopback_host_candidate(pc)
    await pc.setLocalDescription(await pc.createAnswer())
    return str(pc.localDescription.sdp)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pcs: list[RTCPeerConnection] = []
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        request = json.loads(line)
        if request.get("close"):
            break
        print(json.dumps({"answer": await answer(request["offer"], pcs)}), flush=True)
    for pc in pcs:
        await pc.close()
    for pc in pcs:
        await aiortc_compat.wait_pc_closed(pc)


def main() -> int:
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
