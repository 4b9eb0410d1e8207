"""The CPUs a process may use: its affinity, its cgroup's CPU quota and the
CPU's instruction-set flags (for native bfloat16).

Read by the worker (how many OpenMP threads its engine runs, on which cores)
and by the hive (which cores each of its workers gets). Every reader takes
its sources as arguments with the machine's own as defaults, so tests pin
``/proc/cpuinfo`` contents, affinities and quota files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# Instruction-set flags of CPUs that compute in bfloat16 natively
# (AVX-512 BF16 on recent AMD and Intel cores, AMX on Intel Xeons).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in ``/proc/cpuinfo`` text (x86 "flags",
    Arm "Features")."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    try:
        return cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def native_bf16_flag(flags: Iterable[str]) -> str | None:
    """The flag that shows native bfloat16, or None."""
    have = set(flags)
    return next((f for f in NATIVE_BF16_FLAGS if f in have), None)


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,6"`` → [0, 1, 2, 3, 6]; ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("empty CPU list")
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 3, 6] → ``"0-3,6"`` (the kernel's and vLLM's notation)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> tuple[Path | None, Path | None]:
    """This process's cgroup folders: (v2 unified, v1 cpu controller); None where absent."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    v2 = v1 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "" and unified.is_dir():
            v2 = unified / rel
        elif "cpu" in controllers.split(","):
            v1 = next((root / n / rel for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
    return v2, v1


def cgroup_cpu_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup allows (e.g. 1.5), None without a limit.
    cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000") of the process's
    cgroup and its parents, else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    v2, v1 = _cgroup_dirs(proc_cgroup, root)
    limits: list[float] = []
    folder = v2
    while folder is not None:
        try:
            fields = (folder / "cpu.max").read_text().split()
        except OSError:
            fields = []
        if fields and fields[0] != "max":
            try:
                limits.append(int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000))
            except (ValueError, ZeroDivisionError):
                pass
        if folder == root or folder.parent == folder or root not in folder.parents:
            break
        folder = folder.parent
    if v1 is not None and not limits:
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
            if quota_us > 0 and period_us > 0:
                limits.append(quota_us / period_us)
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


@dataclass(frozen=True)
class CpuBudget:
    """The cores a process may run on and how many of them its quota pays for."""

    allowed: tuple[int, ...]
    quota: float | None = None

    @property
    def usable(self) -> int:
        """Threads worth running: the allowed cores, capped by the quota (at least 1)."""
        n = len(self.allowed)
        if self.quota is not None:
            n = min(n, max(1, math.floor(self.quota + 1e-9)))
        return max(1, n)

    @property
    def cores(self) -> tuple[int, ...]:
        """The cores the process may keep busy: the first ``usable`` allowed ones."""
        return self.allowed[: self.usable]

    @property
    def omp_cores(self) -> tuple[int, ...]:
        """The cores for the engine's OpenMP threads: all of ``cores`` but the
        last, which is left to the engine's scheduler process and the worker's
        server (as vLLM's own binding does); the one core when there is one.
        Threads bound to every core stall whenever another process needs one:
        on a busy 2-core machine that was 5-8x slower (docs/hive.md)."""
        cores = self.cores
        return cores[:-1] if len(cores) > 1 else cores

    def describe(self) -> str:
        omp = self.omp_cores
        text = f"{len(omp)} thread(s) on cores {format_cpu_list(omp)}"
        if len(omp) < len(self.cores):
            text += f", core {format_cpu_list(self.cores[len(omp):])} left to the engine's scheduler and the worker's server"
        limits = [f"affinity {format_cpu_list(self.allowed)}"]
        if self.quota is not None:
            limits.append(f"cgroup quota {self.quota:g} CPUs")
        return f"{text} ({', '.join(limits)})"


def cpu_budget(
    affinity: Iterable[int] | None = None, proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT
) -> CpuBudget:
    """This process's budget: ``os.sched_getaffinity`` and the cgroup quota
    (never ``os.cpu_count()``, which counts the machine's cores)."""
    if affinity is None:
        getter = getattr(os, "sched_getaffinity", None)
        affinity = getter(0) if getter else range(os.cpu_count() or 1)
    return CpuBudget(tuple(sorted(affinity)), cgroup_cpu_quota(proc_cgroup, root))
