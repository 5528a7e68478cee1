"""Where transceivers are: an immutable `TopologyView` and the sources that produce it.

The router holds one view and swaps it whole when a source reports a change, so the hot
path does dict lookups only (no network lookup per packet). Sources: static entries from
settings and geosteer's WatchTopology stream, merged (static entries win on conflict).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio

from libs.observability.telemetry import log_event
from libs.service.auth import internal_channel
from libs.wire.framing import Address
from services.relay.settings import parse_transceiver_entry
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

logger = logging.getLogger("voiceedge.relay.topology")


def normalize_ip(ip: str) -> str:
    """The canonical text of an IP literal, as the socket layer reports it."""
    return str(ipaddress.ip_address(ip))


@dataclass(frozen=True)
class TopologyView:
    """(cluster id, transceiver id) -> the transceiver's internal media address."""

    transceivers: Mapping[tuple[int, int], Address] = field(default_factory=dict)
    revision: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clusters", frozenset(c for c, _ in self.transceivers))
        object.__setattr__(self, "media_sources", frozenset(self.transceivers.values()))

    clusters: frozenset[int] = field(init=False, default=frozenset())
    media_sources: frozenset[Address] = field(init=False, default=frozenset())

    def merged(self, other: TopologyView) -> TopologyView:
        """`other` with this view's entries laid over it."""
        return TopologyView({**other.transceivers, **self.transceivers}, other.revision)


def static_view(entries: Iterable[str]) -> TopologyView:
    """From the `transceivers` setting: `'<cluster>/<transceiver>=<ip>:<port>'`."""
    table: dict[tuple[int, int], Address] = {}
    for entry in entries:
        cluster_id, transceiver_id, host, port = parse_transceiver_entry(entry)
        table[(cluster_id, transceiver_id)] = (normalize_ip(host), port)
    return TopologyView(table)


def view_from_proto(topology: geosteer_pb2.Topology) -> TopologyView:
    """Every TRANSCEIVER node with a media address, in every cluster geosteer knows."""
    table: dict[tuple[int, int], Address] = {}
    for cluster in topology.clusters:
        for node in cluster.nodes:
            if node.kind != common_pb2.NODE_KIND_TRANSCEIVER:
                continue
            media = node.media_address
            if not media.ip or not media.port:
                continue
            try:
                ip = normalize_ip(media.ip)
            except ValueError:
                log_event(
                    logger, "topology.bad_address", level=logging.WARNING, node__id=node.node_id
                )
                continue
            table[(node.cluster_id or cluster.cluster_id, node.transceiver_id)] = (ip, media.port)
    return TopologyView(table, topology.revision)


class TopologySource(Protocol):
    """Produces topology views; `run` reports each new one until cancelled."""

    def current(self) -> TopologyView: ...

    async def run(self, on_update: Callable[[TopologyView], None]) -> None: ...


class StaticTopology:
    """The `transceivers` setting, never changing."""

    def __init__(self, view: TopologyView) -> None:
        self._view = view

    def current(self) -> TopologyView:
        return self._view

    async def run(self, on_update: Callable[[TopologyView], None]) -> None:
        return None


class GeosteerTopology:
    """Watches geosteer's WatchTopology stream and reconnects with backoff when it breaks.
    Static entries are laid over what geosteer says."""

    def __init__(self, address: str, static: TopologyView, max_backoff_s: float = 5.0) -> None:
        self._address = address
        self._static = static
        self._view = static
        self._max_backoff_s = max_backoff_s
        self.updates = 0
        self.errors = 0

    def current(self) -> TopologyView:
        return self._view

    async def run(self, on_update: Callable[[TopologyView], None]) -> None:
        backoff = 0.1
        async with internal_channel(self._address) as channel:
            stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
            while True:  # until cancelled; each turn waits at least `backoff`
                call = stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
                try:
                    async for message in call:
                        self._view = self._static.merged(view_from_proto(message.topology))
                        self.updates += 1
                        backoff = 0.1
                        on_update(self._view)
                        log_event(
                            logger,
                            "topology.updated",
                            revision=message.revision,
                            transceivers=len(self._view.transceivers),
                        )
                except grpc.aio.AioRpcError as exc:
                    self.errors += 1
                    log_event(
                        logger,
                        "topology.watch_failed",
                        level=logging.WARNING,
                        server__address=self._address,
                        rpc__grpc__status_code=exc.code().name,
                    )
                finally:
                    call.cancel()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)


def make_topology_source(
    transceivers: Iterable[str], geosteer_address: str
) -> StaticTopology | GeosteerTopology:
    static = static_view(transceivers)
    if geosteer_address:
        return GeosteerTopology(geosteer_address, static)
    return StaticTopology(static)
