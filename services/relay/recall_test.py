"""Binding recall at worker start: a fake transceiver (a real UDP socket) answers the
relay's hellos; only entries proven with the session's password, for this incarnation,
from the named transceiver's media address, become bindings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from libs.wire import framing, recall, ufrag
from services.relay.recall import BindingRecall, accept
from services.relay.relay_testing import KEYS, recv, udp_socket
from services.relay.router import Router
from services.relay.topology import static_view

pytestmark = pytest.mark.timeout(30)

CLIENT = ("203.0.113.7", 50000)
OTHER_CLIENT = ("203.0.113.8", 50001)


def _entry(
    nonce: bytes, client: tuple[str, int], *, tcp: bool = False, good: bool = True
) -> recall.Entry:
    server = ufrag.mint(KEYS, 1, 2)
    password = ufrag.password(server, KEYS) if good else "not-the-password-of-this-ufrag"
    header = framing.header(client[0], client[1], tcp=tcp)
    return recall.Entry(header, server, recall.proof(password, nonce, header, server))


def _router(media: tuple[str, int]) -> Router:
    return Router(KEYS, static_view([f"1/2={media[0]}:{media[1]}"]))


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):  # 10 s at most
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_starting_worker_installs_what_its_transceiver_announces() -> None:
    transceiver = udp_socket()
    media = transceiver.getsockname()
    media = (media[0], media[1])
    router = _router(media)
    recaller = BindingRecall(router, KEYS, "127.0.0.1:0")
    try:
        await recaller.start()
        first, relay = await recv(transceiver)
        nonce = recall.decode_hello(first)
        # The first hello is "lost": the worker greets again.
        again, _ = await recv(transceiver)
        assert recall.decode_hello(again) == nonce
        entries = [
            _entry(nonce, CLIENT),
            _entry(nonce, OTHER_CLIENT, good=False),  # forged proof
            _entry(nonce, ("203.0.113.9", 50002), tcp=True),  # TCP: not this plane's
        ]
        for datagram in recall.encode_announce(nonce, entries):
            transceiver.sendto(datagram, relay)
        await _until(lambda: recaller.counts.installed + recaller.counts.rejected >= 3)
        binding = router.get(CLIENT)
        assert binding is not None
        assert binding.media == media
        assert router.get(OTHER_CLIENT) is None
        assert (recaller.counts.installed, recaller.counts.rejected) == (1, 2)
        # Answered: no more hellos (the retries would have gone by within 3.75 s).
        hellos = recaller.counts.hellos_sent
        await asyncio.sleep(4.0)
        assert recaller.counts.hellos_sent == hellos
    finally:
        recaller.close()
        transceiver.close()


async def test_a_transceiver_that_never_answers_is_greeted_a_bounded_number_of_times() -> None:
    transceiver = udp_socket()
    router = _router(transceiver.getsockname())
    recaller = BindingRecall(router, KEYS, "127.0.0.1:0")
    try:
        await recaller.start()
        hellos = 0
        for _ in range(10):  # ends when the worker stops greeting (3 s of silence)
            try:
                await recv(transceiver, timeout_s=3.0)
            except TimeoutError:
                break
            hellos += 1
        assert hellos == 5
    finally:
        recaller.close()
        transceiver.close()


def test_an_announce_from_elsewhere_or_for_another_incarnation_installs_nothing() -> None:
    media = ("10.1.0.5", 40000)
    router = _router(media)
    nonce = bytes(range(16))
    [datagram] = recall.encode_announce(nonce, [_entry(nonce, CLIENT)])
    assert accept(router, KEYS, nonce, datagram, ("10.1.0.6", 40000), 0.0) == (0, 1)
    assert accept(router, KEYS, bytes(16), datagram, media, 0.0) == (0, 1)
    assert accept(router, KEYS, nonce, datagram[:-1], media, 0.0) == (0, 1)
    assert accept(router, KEYS, nonce, b"VC\x01\x02", media, 0.0) == (0, 1)
    assert router.get(CLIENT) is None
    assert accept(router, KEYS, nonce, datagram, media, 0.0) == (1, 0)
    assert router.get(CLIENT) is not None


def test_an_unknown_transceiver_gets_no_binding() -> None:
    router = Router(KEYS, static_view([]))
    nonce = bytes(16)
    [datagram] = recall.encode_announce(nonce, [_entry(nonce, CLIENT)])
    assert accept(router, KEYS, nonce, datagram, ("10.1.0.5", 40000), 0.0) == (0, 1)
