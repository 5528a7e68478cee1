"""CPUs from the cgroup quota and the affinity mask: what relay workers=0 starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.service.cpus import cgroup_quota, cpus_from, quota_cpus, usable_cpus


@pytest.mark.parametrize(
    ("cpu_max", "v1_quota", "v1_period", "expected"),
    [
        ("max 100000\n", None, None, None),  # v2, no limit
        ("200000 100000\n", None, None, 2.0),  # v2, limits.cpu: 2
        ("50000 100000\n", None, None, 0.5),
        (None, "-1\n", "100000\n", None),  # v1, no limit
        (None, "150000\n", "100000\n", 1.5),
        (None, None, None, None),  # no cgroup files at all
        ("garbage", None, None, None),
        ("0 100000", None, None, None),
    ],
)
def test_quota_from_cgroup_text(
    cpu_max: str | None, v1_quota: str | None, v1_period: str | None, expected: float | None
) -> None:
    assert quota_cpus(cpu_max, v1_quota, v1_period) == expected


@pytest.mark.parametrize(
    ("quota", "affinity", "expected"),
    [
        (None, 64, 64),  # no quota: every CPU we may run on
        (1.0, 64, 1),  # the case: a 1-CPU limit on a 64-core node
        (1.5, 64, 2),  # fractional rounds up
        (0.5, 64, 1),  # never below one
        (8.0, 4, 4),  # affinity (cpuset) narrower than the quota
    ],
)
def test_workers_from_quota_and_affinity(quota: float | None, affinity: int, expected: int) -> None:
    assert cpus_from(quota, affinity) == expected


def test_reads_a_cgroup_v2_tree(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert usable_cpus(tmp_path) == 1


def test_reads_a_cgroup_v1_tree(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) >= 1


def test_cgroup_quota_is_the_fraction_a_container_may_use(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cgroup_quota(tmp_path) == 0.5
