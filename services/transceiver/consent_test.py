"""Consent freshness (RFC 7675) as the transceiver runs it: two real aioice connections on
127.0.0.1 sockets; the controlling one (the caller) answers consent checks late or not at
all, and the controlled one (ours) keeps or ends consent accordingly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aioice
import aioice.ice
import pytest

from libs.wire import stun
from services.transceiver import aiortc_compat
from services.transceiver.transceiver_testing import wait_for


class Peers:
    def __init__(self, caller: aioice.Connection, ours: aioice.Connection) -> None:
        self.caller = caller
        self.ours = ours
        self.checks_seen = 0
        self._original: Any = None
        self.closed = asyncio.Event()
        original_close = ours.close

        async def close() -> None:
            self.closed.set()
            await original_close()

        ours.close = close  # type: ignore[method-assign]

    def answer(self, *, delay_s: float | None) -> None:
        """From now on the caller answers binding requests after `delay_s` (None: never)."""
        (protocol,) = self.caller._protocols
        # The protocol's own handler, also when called again (not the previous wrapper).
        if self._original is None:
            self._original = protocol.datagram_received
        original = self._original
        loop = asyncio.get_running_loop()

        def datagram_received(data: bytes | str, addr: tuple[Any, ...]) -> None:
            assert isinstance(data, bytes)
            try:
                is_request = stun.parse(data).message_type == stun.BINDING_REQUEST
            except stun.StunError:
                is_request = False
            if not is_request:
                original(data, addr)
                return
            self.checks_seen += 1
            if delay_s is not None:
                loop.call_later(delay_s, original, data, addr)

        protocol.datagram_received = datagram_received  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def connected_peers(**options: Any) -> AsyncIterator[Peers]:
    loop = asyncio.get_running_loop()
    caller = aioice.Connection(ice_controlling=True)
    ours = aioice.Connection(ice_controlling=False)
    for connection in (caller, ours):
        transport, protocol = await loop.create_datagram_endpoint(
            lambda connection=connection: aioice.ice.StunProtocol(connection),  # type: ignore[misc]
            local_addr=("127.0.0.1", 0),
        )
        host, port = transport.get_extra_info("sockname")[:2]
        aiortc_compat.install_protocol(connection, protocol, transport, host, port, reconnect=False)
    aiortc_compat.install_consent_freshness(ours, **options)
    for local, remote in ((caller, ours), (ours, caller)):
        local.remote_username = remote.local_username
        local.remote_password = remote.local_password
        for candidate in remote.local_candidates:
            await local.add_remote_candidate(candidate)
        await local.add_remote_candidate(None)
    await asyncio.gather(caller.connect(), ours.connect())
    try:
        yield Peers(caller, ours)
    finally:
        await asyncio.gather(caller.close(), ours.close())


FAST = {"interval_s": 0.1, "expiry_s": 1.0}


@pytest.mark.timeout_s(20)
async def test_late_answers_keep_consent() -> None:
    async with connected_peers(**FAST, retransmissions=3) as peers:
        # Every answer comes 0.7 s late: past aioice's single 0.5 s try, but inside a
        # check's retransmission window. Observed for 2.5x the 1 s expiry (a window in
        # which nothing may happen, not a wait for something).
        peers.answer(delay_s=0.7)
        await asyncio.sleep(2.5)
        assert peers.checks_seen >= 15
        assert not peers.closed.is_set()
        assert not aiortc_compat.consent_expired(peers.ours)


@pytest.mark.timeout_s(20)
async def test_answers_later_than_every_check_end_consent() -> None:
    async with connected_peers(**FAST, retransmissions=0) as peers:
        # The same lateness with one 0.5 s try per check (aioice's way): consent ends.
        peers.answer(delay_s=0.7)
        async with asyncio.timeout(10):
            await peers.closed.wait()
        assert aiortc_compat.consent_expired(peers.ours)


@pytest.mark.timeout_s(20)
async def test_silence_ends_consent_after_expiry() -> None:
    async with connected_peers(**FAST, retransmissions=3) as peers:
        loop = asyncio.get_running_loop()
        started = loop.time()
        peers.answer(delay_s=None)
        async with asyncio.timeout(10):
            await peers.closed.wait()
        assert aiortc_compat.consent_expired(peers.ours)
        # Not before the expiry (1 s) after the last answer, which came at most at `started`.
        assert loop.time() - started >= FAST["expiry_s"] - 0.2


@pytest.mark.timeout_s(20)
async def test_expiry_with_a_grace_keeps_the_connection_and_a_refresh_checks_again() -> None:
    expired = asyncio.Event()
    async with connected_peers(**FAST, retransmissions=0, on_expired=expired.set) as peers:
        peers.answer(delay_s=None)
        async with asyncio.timeout(10):
            await expired.wait()
        # The session decides what silence means: the connection is left open.
        assert not peers.closed.is_set()
        assert not aiortc_compat.consent_expired(peers.ours)
        task = peers.ours._query_consent_task
        assert task is not None
        async with asyncio.timeout(5):
            await asyncio.shield(task)  # the loop ended with the callback
        # The client is back (a new pair was selected): the checks start over from now.
        peers.answer(delay_s=0.0)
        seen = peers.checks_seen
        expired.clear()
        aiortc_compat.refresh_consent(peers.ours)
        await wait_for(lambda: peers.checks_seen >= seen + 5, 5)
        assert not expired.is_set()
        assert not peers.closed.is_set()
