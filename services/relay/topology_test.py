"""Topology sources: the static setting and geosteer's WatchTopology over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from libs.config.settings import SettingsError
from libs.service.aio import cancel_and_wait
from services.relay.topology import (
    GeosteerTopology,
    TopologyView,
    decode_view,
    encode_view,
    left,
    retained,
    static_view,
    view_from_proto,
)
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc


def _topology(revision: int, port: int) -> geosteer_pb2.Topology:
    return geosteer_pb2.Topology(
        revision=revision,
        clusters=[
            geosteer_pb2.Cluster(
                cluster_id=2,
                nodes=[
                    geosteer_pb2.Node(
                        node_id="t1",
                        kind=common_pb2.NODE_KIND_TRANSCEIVER,
                        cluster_id=2,
                        transceiver_id=5,
                        media_address=common_pb2.SocketAddress(ip="127.0.0.1", port=port),
                    ),
                    geosteer_pb2.Node(
                        node_id="r1",
                        kind=common_pb2.NODE_KIND_RELAY,
                        cluster_id=2,
                        media_address=common_pb2.SocketAddress(ip="127.0.0.1", port=1),
                    ),
                    geosteer_pb2.Node(node_id="t2", kind=common_pb2.NODE_KIND_TRANSCEIVER),
                ],
            )
        ],
    )


def test_static_view() -> None:
    view = static_view(["1/1=127.0.0.1:40000", "7/42=[::1]:40001"])
    assert view.transceivers == {(1, 1): ("127.0.0.1", 40000), (7, 42): ("::1", 40001)}
    assert view.clusters == frozenset({1, 7})
    assert ("::1", 40001) in view.media_sources
    for bad in ("1=127.0.0.1:1", "a/b=127.0.0.1:1", "1/1=127.0.0.1:0", "1/70000=1.2.3.4:5"):
        with pytest.raises(SettingsError):
            static_view([bad])


def test_view_from_proto_keeps_transceivers_with_media() -> None:
    view = view_from_proto(_topology(3, 41000))
    assert view.transceivers == {(2, 5): ("127.0.0.1", 41000)}
    assert view.revision == 3
    merged = TopologyView({(2, 5): ("127.0.0.1", 9)}).merged(view)
    assert merged.transceivers == {(2, 5): ("127.0.0.1", 9)}


class _Geosteer(geosteer_pb2_grpc.GeosteerServiceServicer):
    def __init__(self) -> None:
        self.topologies: asyncio.Queue[geosteer_pb2.Topology] = asyncio.Queue()

    async def WatchTopology(  # noqa: N802 (gRPC method name)
        self,
        request: geosteer_pb2.WatchTopologyRequest,
        context: grpc.aio.ServicerContext[
            geosteer_pb2.WatchTopologyRequest, geosteer_pb2.WatchTopologyResponse
        ],
    ) -> AsyncIterator[geosteer_pb2.WatchTopologyResponse]:
        while True:  # until the client cancels
            topology = await self.topologies.get()
            yield geosteer_pb2.WatchTopologyResponse(topology=topology, revision=topology.revision)


async def test_geosteer_watch_updates_the_view() -> None:
    servicer = _Geosteer()  # type: ignore[abstract]  # only WatchTopology is needed
    server = grpc.aio.server()
    geosteer_pb2_grpc.add_GeosteerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    updates: asyncio.Queue[TopologyView] = asyncio.Queue()
    source = GeosteerTopology(f"127.0.0.1:{port}", static_view(["1/1=127.0.0.1:40000"]))
    task = asyncio.create_task(source.run(updates.put_nowait))
    try:
        await servicer.topologies.put(_topology(1, 41000))
        view = await asyncio.wait_for(updates.get(), 10)
        assert view.transceivers == {(1, 1): ("127.0.0.1", 40000), (2, 5): ("127.0.0.1", 41000)}
        await servicer.topologies.put(_topology(2, 42000))
        view = await asyncio.wait_for(updates.get(), 10)
        assert view.transceivers[(2, 5)] == ("127.0.0.1", 42000)
        assert source.current() is view
        assert view.gone == frozenset()
        await servicer.topologies.put(geosteer_pb2.Topology(revision=3))  # 2/5 left
        view = await asyncio.wait_for(updates.get(), 10)
        assert view.gone == {(2, 5)}  # left in this stream, not merely unheard of
        assert view.transceivers == {(1, 1): ("127.0.0.1", 40000)}
    finally:
        await cancel_and_wait(task)
        await server.stop(0)


A, B = ("10.20.0.2", 40000), ("10.20.0.3", 40000)


@pytest.mark.parametrize(
    ("fresh", "in_use", "wall", "kept"),
    [
        ({(1, 1): A, (1, 2): B}, set(), 10.0, set()),  # named again: nothing retained
        ({}, set(), 10.0, {(1, 1), (1, 2)}),  # empty answer within the hold: all kept
        ({(1, 1): A}, set(), 10.0, {(1, 2)}),  # partial answer
        ({}, set(), 70.0, set()),  # hold passed, no bindings: gone
        ({}, {(1, 2)}, 70.0, {(1, 2)}),  # hold passed, live bindings: kept
    ],
)
def test_retained_keeps_what_an_answer_leaves_out(
    fresh: dict[tuple[int, int], tuple[str, int]],
    in_use: set[tuple[int, int]],
    wall: float,
    kept: set[tuple[int, int]],
) -> None:
    previous = TopologyView({(1, 1): A, (1, 2): B}, 1, {(1, 1): 0.0, (1, 2): 0.0})
    view = retained(previous, TopologyView(fresh, 2), wall, 60.0, in_use)
    assert view.retained == kept
    assert set(view.transceivers) == set(fresh) | kept
    assert view.revision == 2
    for key in kept:  # a retained node keeps the time it was last named
        assert view.seen_at[key] == 0.0


def test_a_node_that_left_is_kept_for_the_gone_grace_only() -> None:
    previous = TopologyView({(1, 1): A, (1, 2): B}, 1, {(1, 1): 0.0, (1, 2): 0.0})
    fresh = TopologyView({(1, 1): A}, 2, gone=frozenset({(1, 2)}))
    # It left in this answer (at 500 s): kept for the grace, live bindings or not.
    view = retained(previous, fresh, 500.0, 60.0, {(1, 2)}, gone_grace_s=5.0)
    assert view.retained == {(1, 2)}
    assert view.seen_at[(1, 2)] == 500.0
    assert view.gone == {(1, 2)}
    later = retained(view, fresh, 505.0, 60.0, {(1, 2)}, gone_grace_s=5.0)
    assert set(later.transceivers) == {(1, 1)}


@pytest.mark.parametrize(
    ("previous", "now", "gone", "expected"),
    [
        (None, set(), set(), set()),  # a stream's first answer is a baseline
        (None, {(1, 1)}, {(1, 2)}, {(1, 2)}),  # a new stream keeps what had left
        ({(1, 1), (1, 2)}, {(1, 1)}, set(), {(1, 2)}),  # left in this stream
        ({(1, 1)}, {(1, 1), (1, 2)}, {(1, 2)}, set()),  # named again: back
    ],
)
def test_left_tells_a_departure_from_a_node_not_heard_of_yet(
    previous: set[tuple[int, int]] | None,
    now: set[tuple[int, int]],
    gone: set[tuple[int, int]],
    expected: set[tuple[int, int]],
) -> None:
    assert left(previous, now, gone) == expected


def test_static_entries_are_never_gone() -> None:
    static = TopologyView({(1, 1): A})
    answer = TopologyView({}, 3, gone=frozenset({(1, 1), (1, 2)}))
    assert static.merged(answer).gone == {(1, 2)}


def test_the_persisted_copy_round_trips_and_rejects_garbage() -> None:
    view = TopologyView({(1, 1): A, (7, 42): ("2001:db8::1", 5)}, 9)
    back = decode_view(encode_view(view), 100.0)
    assert back.transceivers == view.transceivers
    assert back.revision == 9
    assert back.seen_at == {(1, 1): 100.0, (7, 42): 100.0}
    for bad in (
        "",
        "[]",
        '{"v": 2, "transceivers": []}',
        '{"v": 1}',
        '{"v": 1, "transceivers": [[1, 1, "nope", 5]]}',
        '{"v": 1, "transceivers": [[1, 1, "10.0.0.1", 0]]}',
        '{"v": 1, "transceivers": [["1", 1, "10.0.0.1", 5]]}',
        '{"v": 1, "transceivers": [[1, 1]]}',
        b"\xff",
    ):
        with pytest.raises(ValueError, match="bad topology copy"):
            decode_view(bad, 0.0)
