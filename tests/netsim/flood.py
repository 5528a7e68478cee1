"""A UDP flood for the relay fault scenarios, in its own process (the caller's event loop
must not share its interpreter): PPS datagrams a second for SECONDS to HOST:PORT from 64
source ports, paced in 1 ms slices. Standard library only (run by path in a namespace).

usage: flood.py HOST PORT PPS SECONDS MODE USERNAME
MODE: random (random bytes, 20-200), forged (Binding requests with the victim's USERNAME
and a random MESSAGE-INTEGRITY), keys (well-formed requests with random ufrags), mixed.
Prints one line: sent=N"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import time

COOKIE = 0x2112A442


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)


def binding_request(username: str) -> bytes:
    body = _attribute(0x0006, username.encode()) + _attribute(0x0008, os.urandom(20))
    return struct.pack("!HHI", 0x0001, len(body), COOKIE) + os.urandom(12) + body


def datagram(mode: str, username: str, rng: random.Random) -> bytes:
    if mode == "mixed":
        mode = rng.choice(("random", "forged", "keys"))
    if mode == "forged":
        return binding_request(username)
    if mode == "keys":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
        fake = "".join(rng.choice(alphabet) for _ in range(len(username.partition(":")[0])))
        return binding_request(f"{fake}:abcd")
    return os.urandom(rng.randint(20, 200))


def main(argv: list[str]) -> int:
    host, port, pps, seconds, mode, username = argv
    target = (host, int(port))
    rate, duration = int(pps), float(seconds)
    rng = random.Random(7)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
    # Pre-built datagrams: the generator must not be the bottleneck.
    pool = [datagram(mode, username, rng) for _ in range(4096)]
    sent = errors = 0
    start = time.monotonic()
    deadline = start + duration
    while True:  # bounded by the deadline
        now = time.monotonic()
        if now >= deadline:
            break
        due = int((now - start) * rate) - sent
        for _ in range(max(0, due)):
            try:
                sockets[sent % 64].sendto(pool[sent % 4096], target)
            except OSError:
                errors += 1  # e.g. ENOBUFS: counted, the slice goes on
            sent += 1
        time.sleep(0.001)
    print(f"errors={errors} sent={sent - errors}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
