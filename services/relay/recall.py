"""Bindings recalled from the transceivers when a worker starts with none (memory mode).

Without Redis a restarted relay (or a replaced worker) knows no client, and a live call's
DTLS/SRTP is dropped until the client's next consent check, seconds later. So the worker
asks: it greets every transceiver of its topology with a hello carrying a fresh nonce, and
installs the entries each one announces back (libs/wire/recall.py: each proven with the
session's ICE password and that nonce, from the media address the ufrag's transceiver
has) through `Router.restore`, the one way a binding from outside the packet path gets in.
A transceiver that does not answer is greeted again at RETRY_S, at most ATTEMPTS times.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libs.config.settings import parse_host_port
from libs.observability.telemetry import log_event
from libs.wire import framing, recall, ufrag
from libs.wire.framing import Address
from services.relay.router import Router
from services.relay.topology import TopologyView

logger = logging.getLogger("voiceedge.relay.recall")

RETRY_S = (0.25, 0.5, 1.0, 2.0)  # after the first hello; ATTEMPTS = 1 + len(RETRY_S)


@dataclass
class RecallCounts:
    hellos_sent: int = 0
    announces: int = 0
    installed: int = 0
    rejected: int = 0  # bad datagram, wrong nonce, wrong source, bad ufrag or proof


def accept(
    router: Router,
    keyring: ufrag.Keyring,
    nonce: bytes,
    data: bytes,
    source: Address,
    now: float,
) -> tuple[int, int]:
    """Installs what an announce from `source` proves; (installed, rejected). Pure but
    for the router's table."""
    try:
        got, entries = recall.decode_announce(data)
    except recall.RecallError:
        return 0, 1
    if got != nonce:
        return 0, max(1, len(entries))
    installed = rejected = 0
    for entry in entries:
        client = _verified_client(router, keyring, nonce, entry, source)
        if client is None:
            rejected += 1
        elif router.restore(client[0], client[1], client[2], now):
            installed += 1
        else:
            rejected += 1
    return installed, rejected


def _verified_client(
    router: Router, keyring: ufrag.Keyring, nonce: bytes, entry: recall.Entry, source: Address
) -> tuple[Address, int, int] | None:
    try:
        ip, port, rest = framing.decode(entry.header)
        token = ufrag.decode(entry.ufrag, keyring)
        password = ufrag.password(entry.ufrag, keyring, token.key_id)
    except (framing.FrameError, ufrag.UfragError):
        return None
    if rest or framing.is_tcp(entry.header):  # UDP clients only: a TCP one died with us
        return None
    media = router.topology.transceivers.get((token.cluster_id, token.transceiver_id))
    if media != source or not recall.verify(entry, password, nonce):
        return None
    return (ip, port), token.cluster_id, token.transceiver_id


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on_datagram(data, (str(addr[0]), int(addr[1])))


class BindingRecall:
    """One worker's recall: its own UDP socket on the internal host (the packet path's
    sockets stay as they are), the hellos, and the announces it installs."""

    def __init__(
        self, router: Router, keyring: ufrag.Keyring, internal_listen: str, worker_id: int = 0
    ) -> None:
        self.router = router
        self.keyring = keyring
        self.worker_id = worker_id
        self.nonce = secrets.token_bytes(recall.NONCE_LEN)  # this incarnation
        self._announce_prefix = recall.announce_prefix(self.nonce)
        self.counts = RecallCounts()
        self._host = parse_host_port(internal_listen, "internal address")[0]
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[Address, int] = {}  # media address -> hellos sent, unanswered
        self._answered: set[Address] = set()
        self._timers: list[asyncio.TimerHandle] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._received), local_addr=(self._host, 0), family=family
        )
        self._transport = transport
        self.greet(self.router.topology)

    def greet(self, view: TopologyView) -> None:
        """Hellos to the transceivers of `view` not greeted yet (call on every update)."""
        for media in view.transceivers.values():
            if media not in self._pending and media not in self._answered:
                self._pending[media] = 0
                self._hello(media)

    def _hello(self, media: Address) -> None:
        sent = self._pending.get(media)
        if self._transport is None or sent is None or sent > len(RETRY_S):
            self._pending.pop(media, None)
            return
        self._transport.sendto(recall.encode_hello(self.nonce), media)
        self.counts.hellos_sent += 1
        self._pending[media] = sent + 1
        if sent < len(RETRY_S):
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(RETRY_S[sent], self._hello, media))

    def _received(self, data: bytes, source: Address) -> None:
        self.counts.announces += 1
        installed, rejected = accept(
            self.router, self.keyring, self.nonce, data, source, time.monotonic()
        )
        self.counts.installed += installed
        self.counts.rejected += rejected
        answered = data[: recall.NONCE_LEN + 4] == self._announce_prefix
        if answered and source in self._pending:  # heard: no more hellos to it
            del self._pending[source]
            self._answered.add(source)
        log_event(
            logger,
            "relay.bindings_recalled",
            worker=self.worker_id,
            transceiver__address=source[0],
            transceiver__port=source[1],
            installed=installed,
            rejected=rejected,
        )

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._pending.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
