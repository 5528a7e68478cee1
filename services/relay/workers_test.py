"""The main process's side of the worker pipe, over a real multiprocessing Pipe with the
test playing the child: garbage from the child is counted and dropped, the handle keeps
working, and binding listings are matched to their requests by id."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection

import pytest

from services.relay import messages
from services.relay.dataplane import WorkerCounters
from services.relay.router import BindingInfo, RouterCounters
from services.relay.store import RedisCounts
from services.relay.workers import RemoteWorker

BINDING = BindingInfo(("10.0.0.1", 5000), 1, 2, ("10.0.0.9", 6000), "UFRAG", 1.0, 3, 4, 5.0)


async def _receive(conn: multiprocessing.connection.Connection) -> messages.Message:
    """The next message the main process sent (read in a thread: Connection blocks)."""
    return messages.decode(await asyncio.to_thread(conn.recv_bytes))


async def test_garbage_from_a_child_is_counted_and_dropped() -> None:
    main_end, child_end = multiprocessing.Pipe()
    remote = RemoteWorker(1, main_end)
    try:
        for junk in (b"", b"\x00\xff", b'["counters", 1]', b'["reboot"]'):
            child_end.send_bytes(junk)
        child_end.send_bytes(messages.encode(messages.Stop()))  # valid, but not for the parent
        child_end.send_bytes(messages.encode(messages.Ready(("127.0.0.1:1",), "127.0.0.1:2")))
        ready = await remote.wait_ready(10)
        assert ready.udp == ("127.0.0.1:1",)
        assert remote.bad_messages == 5

        counters = WorkerCounters(RouterCounters(bindings_active=3), RedisCounts(hits=2))
        child_end.send_bytes(messages.encode(messages.CountersReport(counters)))
        listing = asyncio.create_task(remote.list_bindings(10))
        request = await _receive(child_end)
        assert isinstance(request, messages.ListBindings)
        # A stale reply (another request id) is ignored; the matching one answers.
        child_end.send_bytes(messages.encode(messages.BindingsReply(request.request_id + 1, ())))
        child_end.send_bytes(
            messages.encode(messages.BindingsReply(request.request_id, (BINDING,)))
        )
        assert await listing == (BINDING,)
        assert remote.counters() == counters  # the pipe is ordered: read before the replies
        assert remote.bad_messages == 5

        remote.drain(1.5)
        assert await _receive(child_end) == messages.Drain(1.5)
    finally:
        await remote.close()
    assert await _receive(child_end) == messages.Stop()
    child_end.close()


async def test_a_child_that_dies_fails_the_ready_wait() -> None:
    main_end, child_end = multiprocessing.Pipe()
    remote = RemoteWorker(1, main_end)
    try:
        child_end.close()
        with pytest.raises(RuntimeError, match="worker 1 died"):
            await remote.wait_ready(10)
        assert await remote.list_bindings(0.5) == ()
    finally:
        await remote.close()
