"""Cheap, bounded admission state for the router: token buckets per key and a replay cache.

Pure and clock-injected like the router (`now` is the data plane's coarse monotonic clock).
Every table has a fixed maximum size, so a flood of new keys costs memory that is bounded
and a lookup that stays O(1).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

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
