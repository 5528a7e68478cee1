"""Token buckets per key and per client IP. Pure: the caller passes the clock."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """One token bucket per name (`rate` tokens/s, at most `burst`), bounded in memory: the
    least recently used buckets are forgotten first (a forgotten bucket starts full again,
    so eviction can only err on the generous side)."""

    def __init__(self, rate_per_s: float, burst: int, max_buckets: int = 100_000) -> None:
        if rate_per_s <= 0 or burst < 1 or max_buckets < 1:
            raise ValueError("rate_per_s > 0, burst >= 1 and max_buckets >= 1 required")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, name: str, now: float) -> float:
        """Takes one token; returns 0.0 if allowed, else the seconds until one is available."""
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[name] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> int:
    """RFC 9110 §10.2.3: Retry-After in whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))
