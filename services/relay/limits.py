"""Cheap, bounded admission state for the router: token buckets per key and a replay cache.

Pure and clock-injected like the router (`now` is the data plane's coarse monotonic clock).
Every table has a fixed maximum size, so a flood of new keys costs memory that is bounded
and a lookup that stays O(1).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from libs.wire.framing import Address

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Budget:
    """A token bucket's shape: `burst` tokens, refilled at `rate_per_s`."""

    rate_per_s: float
    burst: float


class Bucket:
    """One token bucket (e.g. the worker's verification budget)."""

    __slots__ = ("_budget", "_last", "_tokens")

    def __init__(self, budget: Budget, now: float) -> None:
        self._budget = budget
        self._tokens = budget.burst
        self._last = now

    def take(self, now: float) -> bool:
        budget = self._budget
        tokens = min(budget.burst, self._tokens + (now - self._last) * budget.rate_per_s)
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class KeyedBuckets(Generic[K]):
    """A token bucket per key, at most `max_keys` of them. When full, the oldest half of
    the keys (by first use) is forgotten: a forgotten key starts again with a full bucket,
    which bounds what a flood of fresh keys can gain to one burst per key."""

    def __init__(self, budget: Budget, max_keys: int) -> None:
        self._budget = budget
        self._max_keys = max(2, max_keys)
        self._buckets: dict[K, list[float]] = {}  # key -> [tokens, last refill]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: K, now: float) -> bool:
        bucket = self._buckets.get(key)
        budget = self._budget
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                for old in list(self._buckets)[: self._max_keys // 2]:
                    del self._buckets[old]
            self._buckets[key] = [budget.burst - 1.0, now]
            return budget.burst >= 1.0
        tokens = min(budget.burst, bucket[0] + (now - bucket[1]) * budget.rate_per_s)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True


class ReplayCache:
    """STUN transaction id -> the address that sent it first, the `size` most recent.
    RFC 8489 §6.3: a transaction id is random and fresh per request, so the same id from a
    second address is a copy of someone else's request, never a client of its own."""

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._seen: dict[bytes, Address] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def replayed(self, transaction_id: bytes, client: Address) -> bool:
        """True if `transaction_id` was recorded from another address."""
        first = self._seen.get(transaction_id)
        return first is not None and first != client

    def record(self, transaction_id: bytes, client: Address) -> None:
        seen = self._seen
        if transaction_id in seen:
            return
        if len(seen) >= self._size:
            del seen[next(iter(seen))]
        seen[transaction_id] = client


class ReplayTable(Protocol):
    """What the router asks about STUN transaction ids (one worker's cache, or a table
    every worker of the relay shares)."""

    def replayed(self, transaction_id: bytes, client: Address) -> bool: ...

    def record(self, transaction_id: bytes, client: Address) -> None: ...


_SLOT = 20  # 12-byte transaction id, CRC-32 of the IP text, 2-byte port, 2 bytes padding


def _address_key(client: Address) -> bytes:
    # Deterministic across processes (str hashes are salted per interpreter).
    return struct.pack("!IH2x", zlib.crc32(client[0].encode()), client[1])


class SharedReplayTable:
    """A direct-mapped table of (transaction id -> first address) in memory shared by every
    worker process of one relay (a memfd the children open through /proc), so a captured
    request replayed from ports the kernel hashes onto another worker is still caught. A
    newer id may overwrite an older one in its slot (bounded: `slots` x 20 bytes). Writes
    are not locked: a torn read costs at most one wrong answer for one packet."""

    def __init__(self, buffer: mmap.mmap, slots: int, fd: int = -1) -> None:
        self._buffer = buffer
        self._slots = slots
        self._fd = fd  # held by the creator, so children can open /proc/<pid>/fd/<fd>

    @classmethod
    def create(cls, slots: int) -> SharedReplayTable:
        slots = max(1, slots)
        fd = os.memfd_create("voiceedge-relay-replays")
        os.ftruncate(fd, slots * _SLOT)
        return cls(mmap.mmap(fd, slots * _SLOT), slots, fd)

    @classmethod
    def attach(cls, path: str, slots: int) -> SharedReplayTable:
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(mmap.mmap(fd, slots * _SLOT), slots)
        finally:
            os.close(fd)

    @property
    def path(self) -> str:
        """Where a child worker of this process opens the table."""
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    @property
    def slots(self) -> int:
        return self._slots

    def _offset(self, transaction_id: bytes) -> int:
        return (int.from_bytes(transaction_id[:4], "big") % self._slots) * _SLOT

    def replayed(self, transaction_id: bytes, client: Address) -> bool:
        offset = self._offset(transaction_id)
        slot = self._buffer[offset : offset + _SLOT]
        return slot[:12] == transaction_id and slot[12:] != _address_key(client)

    def record(self, transaction_id: bytes, client: Address) -> None:
        offset = self._offset(transaction_id)
        if self._buffer[offset : offset + 12] == transaction_id:
            return
        self._buffer[offset : offset + _SLOT] = transaction_id + _address_key(client)

    def close(self) -> None:
        self._buffer.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
