"""How many CPUs this process may really use: the cgroup CPU quota and the affinity mask, not
the host's core count (`os.cpu_count()` says 64 on a big node even under a 1-CPU limit).

`usable_cpus()` reads the container's own view: cgroup v2 `cpu.max` ("<quota> <period>" or
"max <period>"), else cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: no quota).
A fractional quota rounds up (1.5 CPUs: two workers, each throttled a little), never below 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(cpu_max: str | None, v1_quota: str | None, v1_period: str | None) -> float | None:
    """The CPU quota in CPUs from the cgroup files' text; None when there is no quota."""
    if cpu_max is not None:
        quota, _, period = cpu_max.strip().partition(" ")
        if quota == "max" or not period:
            return None
        return _ratio(quota, period)
    if v1_quota is not None and v1_period is not None:
        if v1_quota.strip().startswith("-"):
            return None
        return _ratio(v1_quota, v1_period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # unreadable: no limit we can honour
    return q / p if q > 0 and p > 0 else None


def cpus_from(quota: float | None, affinity: int) -> int:
    """Worker count for a quota (None: unlimited) and the number of CPUs in the affinity mask."""
    limit = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, limit)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """This container's CPU quota in CPUs (None: no quota)."""
    return quota_cpus(
        _read(root / "cpu.max"),
        _read(root / "cpu" / "cpu.cfs_quota_us"),
        _read(root / "cpu" / "cpu.cfs_period_us"),
    )


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return cpus_from(cgroup_quota(root), affinity or os.cpu_count() or 1)
