"""The processes of vLLM's engine as ``/proc`` and the cgroup filesystem
show them: liveness, names, children, resident memory and the memory cgroup
with its OOM kill counter and limit.

Every reader takes its root folders as parameters so tests drive them with
fake ``/proc`` and cgroup trees; none raises for a process that is gone (it
answers None, False or nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CGROUP_FS = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge page-aligned number.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryCgroup:
    """The memory cgroup a process is in: its name (as /proc/PID/cgroup
    gives it) and its folder in the cgroup filesystem."""

    name: str
    path: Path
    version: int  # 1 or 2

    def _read(self, file: str) -> str | None:
        try:
            return (self.path / file).read_text()
        except OSError:
            return None

    def oom_kill_count(self) -> int | None:
        """Processes of this cgroup the OOM killer has killed (None when the
        kernel does not count them here)."""
        text = self._read("memory.oom_control" if self.version == 1 else "memory.events")
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def limit_bytes(self) -> int | None:
        """The cgroup's own memory limit (None: none, or unknown)."""
        text = self._read("memory.limit_in_bytes" if self.version == 1 else "memory.max")
        if text is None or text.strip() == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= _UNLIMITED else value


def memory_cgroup(pid: int, proc: Path = PROC, fs: Path = CGROUP_FS) -> MemoryCgroup | None:
    """The memory cgroup of a live process (None when it is gone or the
    machine has no memory controller)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    unified: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, name = parts
        if "memory" in controllers.split(","):
            return MemoryCgroup(name, fs / "memory" / name.lstrip("/"), 1)
        if hierarchy == "0" and controllers == "":
            unified = name
    if unified is None:
        return None
    # cgroup v2: the unified hierarchy at the root (or at ./unified on hybrid
    # machines, where it has no memory controller; v1's line won above).
    for root in (fs, fs / "unified"):
        try:
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return MemoryCgroup(unified, root / unified.lstrip("/"), 2)
        except OSError:
            continue
    return None


def resident_bytes(pid: int, proc: Path = PROC) -> int | None:
    try:
        fields = (proc / str(pid) / "statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def is_alive(pid: int, proc: Path = PROC) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return text.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def process_name(pid: int, proc: Path = PROC) -> str:
    for file in ("cmdline", "comm"):
        try:
            text = (proc / str(pid) / file).read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if text:
            # vLLM names its processes (VLLM::EngineCore); plain ones are a path.
            return text if "::" in text else Path(text).name
    return ""


def children_of(pid: int, proc: Path = PROC) -> list[int]:
    """Direct children (every thread's list; /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out
