"""Where transceivers are: an immutable `TopologyView` and the sources that produce it.

The router holds one view and swaps it whole when a source reports a change, so the hot
path does dict lookups only (no network lookup per packet). Sources: static entries from
settings and geosteer's WatchTopology stream, merged (static entries win on conflict).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from libs.observability.telemetry import log_event
from libs.wire.framing import Address
from services.relay.settings import parse_transceiver_entry
from voiceedge.common.v1 import common_pb2

if TYPE_CHECKING:
    from voiceedge.geosteer.v1 import geosteer_pb2

logger = logging.getLogger("voiceedge.relay.topology")


def normalize_ip(ip: str) -> str:
    """The canonical text of an IP literal, as the socket layer reports it."""
    return str(ipaddress.ip_address(ip))


@dataclass(frozen=True)
class TopologyView:
    """(cluster id, transceiver id) -> the transceiver's internal media address."""

    transceivers: Mapping[tuple[int, int], Address] = field(default_factory=dict)
    revision: int = 0
    # Wall clock (time.time()) when each node was last in a source's answer; see `retained`.
    seen_at: Mapping[tuple[int, int], float] = field(default_factory=dict)
    # Nodes kept although the last answer did not name them.
    retained: frozenset[tuple[int, int]] = frozenset()
    # Nodes the source saw leave (in one answer, missing from a later answer of the same
    # stream: deregistered or declared dead by geosteer), as opposed to not heard of yet.
    gone: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "clusters", frozenset(c for c, _ in self.transceivers))
        object.__setattr__(self, "media_sources", frozenset(self.transceivers.values()))

    clusters: frozenset[int] = field(init=False, default=frozenset())
    media_sources: frozenset[Address] = field(init=False, default=frozenset())

    def merged(self, other: TopologyView) -> TopologyView:
        """`other` with this view's entries laid over it."""
        table = {**other.transceivers, **self.transceivers}
        return TopologyView(table, other.revision, gone=other.gone - table.keys())


def retained(
    previous: TopologyView,
    fresh: TopologyView,
    wall: float,
    hold_s: float,
    in_use: Container[tuple[int, int]],
    gone_grace_s: float = 0.0,
) -> TopologyView:
    """The view to route on: `fresh` (the source's latest answer), plus every node of
    `previous` that the answer no longer names but that still has bindings (`in_use`) or
    was last named less than `hold_s` ago. So an empty or partial answer (a geosteer that
    just restarted and has not heard every node again) and a deregistered, draining
    transceiver with calls still ending never cut a live call; a node leaves once it is
    gone from the answers for `hold_s` and has no binding left. A node the source saw
    leave (`fresh.gone`: deregistered after its drain, or declared dead) is kept only
    `gone_grace_s` after it was last named, bindings or not: a dead transceiver's callers,
    whose checks keep their bindings alive, must not keep it (and their Redis copies)
    forever."""
    table = dict(fresh.transceivers)
    seen = dict.fromkeys(table, wall)
    kept: set[tuple[int, int]] = set()
    for key, media in previous.transceivers.items():
        if key in table:
            continue
        seen_at = previous.seen_at.get(key, wall)
        if key in fresh.gone:
            if key not in previous.retained:
                seen_at = wall  # it left in this answer: the grace starts now
            keep = wall - seen_at < gone_grace_s
        else:
            keep = key in in_use or wall - seen_at < hold_s
        if keep:
            table[key] = media
            seen[key] = seen_at
            kept.add(key)
    return TopologyView(table, fresh.revision, seen, frozenset(kept), fresh.gone)


def encode_view(view: TopologyView) -> str:
    """The persisted copy (Redis `voiceedge:relay:topology`): JSON, one entry per node."""
    entries = [
        [cluster, transceiver, media[0], media[1]]
        for (cluster, transceiver), media in sorted(view.transceivers.items())
    ]
    return json.dumps({"v": 1, "revision": view.revision, "transceivers": entries})


def decode_view(text: str | bytes, loaded_at: float) -> TopologyView:
    """The persisted copy back; every node counts as seen at `loaded_at` (a relay starting
    while geosteer is down holds them for topology_hold_s from its start). ValueError if
    the text is not that."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a v1 topology")
        table: dict[tuple[int, int], Address] = {}
        for cluster, transceiver, ip, port in data["transceivers"]:
            if not (isinstance(cluster, int) and isinstance(transceiver, int)):
                raise ValueError("ids must be integers")
            if not (isinstance(port, int) and 0 < port < 65536):
                raise ValueError("bad port")
            table[(cluster, transceiver)] = (normalize_ip(str(ip)), port)
        revision = int(data.get("revision", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad topology copy: {exc}") from None
    return TopologyView(table, revision, dict.fromkeys(table, loaded_at))


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


MAX_GONE = 10_000  # bound on the nodes remembered as gone


def left(
    previous: Iterable[tuple[int, int]] | None,
    now: Iterable[tuple[int, int]],
    gone: Iterable[tuple[int, int]],
) -> frozenset[tuple[int, int]]:
    """The nodes known to have left after an answer naming `now`: those of `previous` (the
    same stream's last answer; None for a stream's first, which only sets a baseline: a
    restarted geosteer starts empty) that `now` leaves out, plus those already `gone` that
    `now` does not name again. Past MAX_GONE, older departures are forgotten (they then
    fall under the ordinary hold)."""
    named = frozenset(now)
    lost = frozenset(previous or ()) - named
    still = frozenset(gone) - named
    if len(still) + len(lost) > MAX_GONE:
        still = frozenset()
    return still | lost


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


def _import_grpc() -> None:
    import grpc.aio  # noqa: F401

    import services.geosteer.client  # noqa: F401
    import voiceedge.geosteer.v1.geosteer_pb2_grpc  # noqa: F401


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
        # gRPC is imported when the watch starts, after the data plane forwards (the
        # relay's first packets need only the persisted copy; services/relay/README.md),
        # and in a thread: an import holds the event loop, which now forwards.
        await asyncio.get_running_loop().run_in_executor(None, _import_grpc)
        import grpc.aio

        from services.geosteer.client import geosteer_channel
        from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc

        backoff = 0.1
        async with geosteer_channel(self._address) as channel:
            stub = geosteer_pb2_grpc.GeosteerServiceStub(channel)
            while True:  # until cancelled; each turn waits at least `backoff`
                call = stub.WatchTopology(geosteer_pb2.WatchTopologyRequest())
                previous: frozenset[tuple[int, int]] | None = None  # this stream's last answer
                try:
                    async for message in call:
                        answer = view_from_proto(message.topology)
                        gone = left(previous, answer.transceivers, self._view.gone)
                        previous = frozenset(answer.transceivers)
                        self._view = self._static.merged(
                            TopologyView(answer.transceivers, answer.revision, gone=gone)
                        )
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
