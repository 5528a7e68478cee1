"""The shared copy of `client address -> transceiver` that lets a restarted relay, or a
sibling worker behind the same address, carry a call on without a new STUN packet.

One small Protocol, two implementations chosen in `make_binding_store`: in-memory (no
shared copy: a miss is a miss) and Redis. Redis errors are counted and never raised, so
the data plane keeps forwarding from its own table while Redis is down.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from libs.observability.telemetry import log_event
from libs.wire.framing import Address

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger("voiceedge.relay.store")

KEY_PREFIX = "voiceedge:relay:binding:"
# The last topology the relay routed on (JSON, services/relay/topology.py encode_view): a
# relay starting while geosteer is down routes on it. Rewritten at least every
# TOPOLOGY_RESAVE_S, so it only expires after a day with no relay running.
TOPOLOGY_KEY = "voiceedge:relay:topology"
TOPOLOGY_TTL_S = 86_400
TOPOLOGY_RESAVE_S = 3_600
SCAN_PAGE = 1000


def binding_key(client: Address) -> str:
    return f"{KEY_PREFIX}{client[0]}:{client[1]}"


def _entry(key: bytes | str, value: bytes | str | None) -> tuple[Address, int, int] | None:
    """One scanned key and its value -> (client, cluster, transceiver); None if malformed
    (or expired between SCAN and MGET)."""
    if value is None:
        return None
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    ip, sep, port = text.removeprefix(KEY_PREFIX).rpartition(":")
    ids = parse_value(value)
    if not sep or ids is None or not port.isdigit():
        return None
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        return None
    return (ip, int(port)), ids[0], ids[1]


def parse_value(value: bytes | str) -> tuple[int, int] | None:
    """`"cluster/transceiver"` -> ids, None if it is not that."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    cluster, sep, transceiver = text.partition("/")
    if not sep:
        return None
    try:
        return int(cluster), int(transceiver)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RedisCounts:
    """A store's operation counters at one moment, or the sum of several workers' (`+`)."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    writes: int = 0

    def __add__(self, other: RedisCounts) -> RedisCounts:
        return RedisCounts(
            self.hits + other.hits,
            self.misses + other.misses,
            self.errors + other.errors,
            self.writes + other.writes,
        )


def counts_of(store: BindingStore) -> RedisCounts:
    return RedisCounts(store.hits, store.misses, store.errors, store.writes)


class BindingStore(Protocol):
    """Counters are plain ints, bumped where they happen; `counts_of` copies them."""

    enabled: bool
    hits: int
    misses: int
    errors: int
    writes: int

    async def put(self, client: Address, cluster_id: int, transceiver_id: int) -> bool: ...

    async def refresh(self, entries: Sequence[tuple[Address, int, int]]) -> bool: ...

    async def get(self, client: Address) -> tuple[int, int] | None: ...

    async def scan(self, limit: int, deadline: float) -> list[tuple[Address, int, int]]: ...

    async def save_topology(self, text: str) -> bool: ...

    async def load_topology(self) -> str | None: ...

    async def close(self) -> None: ...


class MemoryBindingStore:
    """No shared copy: the relay runs on its own table only."""

    enabled = False

    def __init__(self) -> None:
        self.hits = self.misses = self.errors = self.writes = 0

    async def put(self, client: Address, cluster_id: int, transceiver_id: int) -> bool:
        return True

    async def refresh(self, entries: Sequence[tuple[Address, int, int]]) -> bool:
        return True

    async def get(self, client: Address) -> tuple[int, int] | None:
        self.misses += 1
        return None

    async def scan(self, limit: int, deadline: float) -> list[tuple[Address, int, int]]:
        return []

    async def save_topology(self, text: str) -> bool:
        return True

    async def load_topology(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


class RedisBindingStore:
    """`voiceedge:relay:binding:<ip>:<port>` -> `"<cluster>/<transceiver>"` with EX=ttl."""

    enabled = True

    def __init__(self, url: str, ttl_s: float, timeout_s: float) -> None:
        # Imported here: redis-py costs 0.1-0.3 s of imports, which a memory-only relay
        # would pay before its first packet for nothing.
        import redis.asyncio
        import redis.exceptions

        self._errors: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OSError)
        self._redis: aioredis.Redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.hits = self.misses = self.errors = self.writes = 0
        self._closed = False

    def _failed(self, op: str, exc: Exception) -> None:
        self.errors += 1
        # One line per failure would flood the log when Redis is down for a while.
        if self.errors == 1 or self.errors % 1000 == 0:
            log_event(
                logger,
                "redis.error",
                level=logging.WARNING,
                db__operation=op,
                error__type=type(exc).__name__,
                errors=self.errors,
            )

    async def put(self, client: Address, cluster_id: int, transceiver_id: int) -> bool:
        try:
            await self._redis.set(
                binding_key(client), f"{cluster_id}/{transceiver_id}", px=self._ttl_ms
            )
        except self._errors as exc:
            self._failed("set", exc)
            return False
        self.writes += 1
        return True

    async def refresh(self, entries: Sequence[tuple[Address, int, int]]) -> bool:
        """Rewrites (not just re-expires) each entry, so keys lost while Redis was down or
        restarted come back with the next refresh."""
        if not entries:
            return True
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for client, cluster_id, transceiver_id in entries:
                    pipe.set(binding_key(client), f"{cluster_id}/{transceiver_id}", px=self._ttl_ms)
                await pipe.execute()
        except self._errors as exc:
            self._failed("set", exc)
            return False
        self.writes += len(entries)
        return True

    async def get(self, client: Address) -> tuple[int, int] | None:
        try:
            value = await self._redis.get(binding_key(client))
        except self._errors as exc:
            self._failed("get", exc)
            return None
        ids = parse_value(value) if value is not None else None
        if ids is None:
            self.misses += 1
        else:
            self.hits += 1
        return ids

    async def scan(self, limit: int, deadline: float) -> list[tuple[Address, int, int]]:
        """Up to `limit` bindings of the copy (SCAN + MGET in pages of SCAN_PAGE) read before
        `deadline` (time.monotonic()): what a starting relay installs before its first
        packet. What was read so far on a Redis error or at the deadline."""
        found: list[tuple[Address, int, int]] = []
        try:
            cursor = 0
            # Bounded: SCAN ends at cursor 0; `limit` and `deadline` cap it.
            while len(found) < limit and time.monotonic() < deadline:
                cursor, keys = await self._redis.scan(
                    cursor, match=f"{KEY_PREFIX}*", count=SCAN_PAGE
                )
                if keys:
                    values = await self._redis.mget(keys)
                    for key, value in zip(keys, values, strict=True):
                        entry = _entry(key, value)
                        if entry is not None:
                            found.append(entry)
                if cursor == 0:
                    break
        except self._errors as exc:
            self._failed("scan", exc)
        self.hits += len(found)
        return found[:limit]

    async def save_topology(self, text: str) -> bool:
        try:
            await self._redis.set(TOPOLOGY_KEY, text, ex=TOPOLOGY_TTL_S)
        except self._errors as exc:
            self._failed("set", exc)
            return False
        self.writes += 1
        return True

    async def load_topology(self) -> str | None:
        try:
            value = await self._redis.get(TOPOLOGY_KEY)
        except self._errors as exc:
            self._failed("get", exc)
            return None
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._redis.aclose()


def make_binding_store(
    redis_url: str, ttl_s: float, timeout_s: float
) -> MemoryBindingStore | RedisBindingStore:
    if redis_url:
        return RedisBindingStore(redis_url, ttl_s, timeout_s)
    return MemoryBindingStore()
