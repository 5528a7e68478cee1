"""First-hop RTTs for geosteer: what the transceiver measures per client prefix.

Geosteer folds these into its per-prefix estimate (services/geosteer/rtt.py), so steering
learns from real latency instead of great-circle distance alone. A session's RTT is the
smallest of its caller's last RTCP round trips (SessionStats.min_rtt_ms, call_metrics.py:
the mean, or aiortc's smoothed remote-inbound-rtp, carries both event loops' lag, which on
a busy host made a 10 ms first hop look longer than a transatlantic one), grouped by the
client's /24 (IPv4) or /48 (IPv6), the prefixes geosteer keys on.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable

from libs.service.aio import cancel_and_wait
from voiceedge.geosteer.v1 import geosteer_pb2
from voiceedge.transceiver.v1 import transceiver_pb2


def client_prefix(ip: str) -> str | None:
    """'203.0.113.7' -> '203.0.113.0/24', IPv6 -> its /48; None for what is not an IP."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    bits = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


def rtt_samples(infos: Iterable[transceiver_pb2.SessionInfo]) -> list[geosteer_pb2.RttSample]:
    """One sample per client prefix: the mean RTT of its connected sessions that have one."""
    sums: dict[str, tuple[float, int]] = {}
    for info in infos:
        stats = info.stats
        if info.state != transceiver_pb2.SESSION_STATE_CONNECTED or stats.min_rtt_ms <= 0:
            continue
        prefix = client_prefix(stats.selected_remote_address.ip)
        if prefix is None:
            continue
        total, count = sums.get(prefix, (0.0, 0))
        sums[prefix] = (total + stats.min_rtt_ms, count + 1)
    return [
        geosteer_pb2.RttSample(client_prefix=prefix, rtt_ms=total / count, sample_count=count)
        for prefix, (total, count) in sorted(sums.items())
    ]


class RttCollector:
    """Samples live sessions every `interval_s`; each batch is handed to one heartbeat."""

    def __init__(
        self,
        sessions: Callable[[], Awaitable[list[transceiver_pb2.SessionInfo]]],
        interval_s: float,
    ) -> None:
        self._sessions = sessions
        self._interval_s = interval_s
        self._pending: list[geosteer_pb2.RttSample] = []
        self._task: asyncio.Task[None] | None = None

    def take(self) -> list[geosteer_pb2.RttSample]:
        samples, self._pending = self._pending, []
        return samples

    async def sample_once(self) -> None:
        self._pending = rtt_samples(await self._sessions())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sample_once()

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
