"""The cores a process may use: affinity and cgroup CPU quota (v2 and v1 files pinned)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.cpus import CpuBudget, cgroup_cpu_quota, cpu_budget, format_cpu_list, parse_cpu_list


def test_cpu_lists_round_trip():
    assert parse_cpu_list("0-3,6") == [0, 1, 2, 3, 6]
    assert format_cpu_list([6, 0, 1, 2, 3]) == "0-3,6"
    assert format_cpu_list([1]) == "1"
    for bad in ("", "3-1", "a", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def _v2(tmp_path: Path, cpu_max: str | None, parent_max: str | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    (root / "cgroup.controllers").parent.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    leaf = root / "system.slice" / "rbee.service"
    leaf.mkdir(parents=True)
    if cpu_max is not None:
        (leaf / "cpu.max").write_text(cpu_max)
    if parent_max is not None:
        (root / "system.slice" / "cpu.max").write_text(parent_max)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/system.slice/rbee.service\n")
    return proc, root


def test_cgroup_v2_quota(tmp_path: Path):
    proc, root = _v2(tmp_path, "150000 100000\n")
    assert cgroup_cpu_quota(proc, root) == 1.5


def test_cgroup_v2_without_limit_and_a_tighter_parent(tmp_path: Path):
    proc, root = _v2(tmp_path, "max 100000\n")
    assert cgroup_cpu_quota(proc, root) is None
    proc, root = _v2(tmp_path / "b", "400000 100000\n", parent_max="100000 100000\n")
    assert cgroup_cpu_quota(proc, root) == 1.0


def test_cgroup_v1_quota(tmp_path: Path):
    root = tmp_path / "cgroup"
    leaf = root / "cpu,cpuacct" / "docker" / "abc"
    leaf.mkdir(parents=True)
    (leaf / "cpu.cfs_quota_us").write_text("250000\n")
    (leaf / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_quota(proc, root) == 2.5
    (leaf / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(proc, root) is None


def test_budget_is_affinity_capped_by_quota(tmp_path: Path):
    proc, root = _v2(tmp_path, "150000 100000\n")
    budget = cpu_budget({2, 3, 5, 7}, proc, root)
    assert budget == CpuBudget((2, 3, 5, 7), 1.5)
    assert (budget.usable, budget.cores) == (1, (2,))
    assert budget.omp_cores == (2,)  # one core: the threads share it
    assert budget.describe() == "1 thread(s) on cores 2 (affinity 2-3,5,7, cgroup quota 1.5 CPUs)"
    four = CpuBudget((0, 1, 2, 3), None)
    assert four.cores == (0, 1, 2, 3) and four.omp_cores == (0, 1, 2)
    assert four.describe() == (
        "3 thread(s) on cores 0-2, core 3 left to the engine's scheduler and the worker's server (affinity 0-3)"
    )
    assert CpuBudget((4, 5), 0.2).usable == 1  # a fraction of a core still runs one thread
