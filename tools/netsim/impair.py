"""The impairment schedule: for each packet, drop it or say when to release it (pure).

One `Schedule` per direction of a link. `decide(now_s, size)` returns the release time in
seconds, or None to drop; the RNG is injected, the clock is the argument, so a table of
(profile, seed, packets) gives the same answer every time.

Model, in the order applied:
1. loss: a Gilbert-Elliott two-state chain. `loss` is the long-run loss rate and
   `burst` the mean length of a loss burst: good->bad with p = loss / (burst * (1 - loss)),
   bad->good with r = 1 / burst, every packet in the bad state lost. burst = 1 gives
   independent (Bernoulli) loss.
2. rate cap: a serialising queue at `rate_kbps`; a packet that would wait longer than
   `queue_ms` is tail-dropped.
3. delay: `delay_ms` plus jitter uniform in [-jitter_ms, +jitter_ms] (floored at 0). Packets
   stay in order (a single path queues, it does not overtake) unless picked for reordering:
   with probability `reorder` a packet skips the delay and overtakes what is queued, like
   netem's `reorder`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Protocol


class Rng(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True)
class Profile:
    """One direction's impairment. All zero: a plain (but userspace) wire."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # 0..1, long-run fraction lost
    burst: float = 1.0  # mean loss-burst length in packets (>= 1)
    reorder: float = 0.0  # 0..1, probability a packet overtakes the queue
    rate_kbps: float = 0.0  # 0: no cap
    queue_ms: float = 200.0  # the rate cap's queue, in time at that rate

    def validate(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.queue_ms < 0 or self.rate_kbps < 0:
            raise ValueError("delay_ms, jitter_ms, queue_ms, rate_kbps must be >= 0")
        if not 0 <= self.loss < 1 or not 0 <= self.reorder <= 1:
            raise ValueError("loss must be in [0, 1), reorder in [0, 1]")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")

    def with_changes(self, changes: dict[str, Any]) -> Profile:
        """A copy with `changes` (field name -> number); unknown names are errors."""
        known = set(self.__dataclass_fields__)
        unknown = set(changes) - known
        if unknown:
            raise ValueError(
                f"unknown impairment settings {sorted(unknown)}; known {sorted(known)}"
            )
        profile = replace(self, **{k: float(v) for k, v in changes.items()})
        profile.validate()
        return profile


class Schedule:
    """One direction's state: the loss chain, the rate queue, the last release time."""

    def __init__(self, profile: Profile, rng: Rng | None = None) -> None:
        profile.validate()
        self.profile = profile
        self._rng: Rng = rng or random.Random()
        self._bad = False
        self._link_free_at = 0.0
        self._last_release = 0.0
        self.dropped_loss = 0
        self.dropped_queue = 0
        self.passed = 0

    def reseed(self, seed: int) -> None:
        """Restarts the loss, jitter and reordering draws from `seed`: the same packets
        are then treated the same way on every run (tests that must see loss)."""
        self._rng = random.Random(seed)
        self._bad = False

    def set_profile(self, profile: Profile) -> None:
        """Takes effect for the next packet; what is already queued keeps its time."""
        profile.validate()
        self.profile = profile
        if profile.loss == 0:
            self._bad = False

    def _lost(self) -> bool:
        p = self.profile
        if p.loss <= 0:
            return False
        to_bad = p.loss / (p.burst * (1.0 - p.loss))
        to_good = 1.0 / p.burst
        if self._bad:
            self._bad = self._rng.random() >= to_good
        else:
            self._bad = self._rng.random() < to_bad
        return self._bad

    def decide(self, now_s: float, size: int) -> float | None:
        p = self.profile
        if self._lost():
            self.dropped_loss += 1
            return None
        sent = now_s
        if p.rate_kbps > 0:
            start = max(now_s, self._link_free_at)
            if (start - now_s) * 1000.0 > p.queue_ms:
                self.dropped_queue += 1
                return None
            sent = start + size * 8 / (p.rate_kbps * 1000.0)
            self._link_free_at = sent
        self.passed += 1
        if p.reorder > 0 and self._rng.random() < p.reorder:
            return sent
        delay = p.delay_ms
        if p.jitter_ms > 0:
            delay += (2.0 * self._rng.random() - 1.0) * p.jitter_ms
        release = max(sent + max(delay, 0.0) / 1000.0, self._last_release)
        self._last_release = release
        return release

    def counters(self) -> dict[str, int]:
        return {
            "passed": self.passed,
            "dropped_loss": self.dropped_loss,
            "dropped_queue": self.dropped_queue,
        }
