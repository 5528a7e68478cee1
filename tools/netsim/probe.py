"""A ping-like UDP probe: an echo server and a paced prober, plus the summary (pure).

The prober sends `count` numbered datagrams `interval_s` apart from one socket and collects
the echoes; each sample is the round-trip time in seconds, or None if none came back
within `timeout_s` of the last send.
"""

from __future__ import annotations

import selectors
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass

HEADER = struct.Struct("!Id")  # sequence, send time (monotonic)


@dataclass(frozen=True)
class Summary:
    sent: int
    received: int
    loss: float
    rtt_median_ms: float
    rtt_p95_ms: float
    rtt_min_ms: float
    rtt_max_ms: float

    def line(self) -> str:
        return (
            f"sent={self.sent} received={self.received} loss={self.loss:.3f} "
            f"rtt_ms min={self.rtt_min_ms:.3f} median={self.rtt_median_ms:.3f} "
            f"p95={self.rtt_p95_ms:.3f} max={self.rtt_max_ms:.3f}"
        )


def summarise(samples: list[float | None]) -> Summary:
    rtts = sorted(s * 1000.0 for s in samples if s is not None)
    if not rtts:
        return Summary(len(samples), 0, 1.0, 0.0, 0.0, 0.0, 0.0)
    return Summary(
        sent=len(samples),
        received=len(rtts),
        loss=1.0 - len(rtts) / len(samples),
        rtt_median_ms=statistics.median(rtts),
        rtt_p95_ms=rtts[min(len(rtts) - 1, int(len(rtts) * 0.95))],
        rtt_min_ms=rtts[0],
        rtt_max_ms=rtts[-1],
    )


class EchoServer:
    """Echoes every datagram on `sock` until close(); a daemon thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def probe(
    sock: socket.socket,
    target: tuple[str, int],
    *,
    count: int,
    interval_s: float,
    size: int = 200,
    timeout_s: float = 1.0,
) -> list[float | None]:
    """Sends `count` probes paced at `interval_s`; returns each one's RTT or None."""
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    rtts: list[float | None] = [None] * count
    padding = b"\0" * max(0, size - HEADER.size)
    start = time.monotonic()
    sent = 0
    deadline = start + count * interval_s + timeout_s
    while True:
        now = time.monotonic()
        if sent < count and now >= start + sent * interval_s:
            sock.sendto(HEADER.pack(sent, now) + padding, target)
            sent += 1
            continue
        if now >= deadline or (sent == count and all(r is not None for r in rtts)):
            break
        wait = deadline - now if sent == count else start + sent * interval_s - now
        for _ in selector.select(max(0.0, min(wait, 0.05))):
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                sequence, sent_at = HEADER.unpack_from(data)
                if 0 <= sequence < count and rtts[sequence] is None:
                    rtts[sequence] = time.monotonic() - sent_at
    selector.close()
    return rtts
