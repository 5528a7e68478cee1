"""The saturation benchmark's echo bridge (testkit.EchoBridge, arrivals recorded) in a process
of its own, so that its arrival times do not wait for the load generator's event loop.

Protocol, one JSON object per line: it prints {"address": "127.0.0.1:PORT"} once serving;
then reads commands on stdin and answers each on stdout:
  {"clear": true}     -> {"cleared": N}           forget the arrivals recorded so far
  {"arrivals": true}  -> {"streams": [[[sequence, monotonic time], ...], ...]}
End of stdin stops it.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

from services.transceiver.transceiver_testing import EchoBridge


async def serve() -> None:
    bridge = EchoBridge()
    bridge.record_arrivals = True
    await bridge.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"address": bridge.address}), flush=True)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command.get("clear"):
                for stream in bridge.streams.values():
                    stream.arrivals.clear()
                answer: dict[str, object] = {"cleared": len(bridge.streams)}
            elif command.get("arrivals"):
                answer = {"streams": [s.arrivals for s in bridge.streams.values()]}
            else:
                answer = {"error": f"unknown command {command!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await bridge.stop()


def main() -> int:
    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
