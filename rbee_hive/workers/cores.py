"""Which cores each CPU worker of this hive may run on.

Two engines on the same cores each run their OpenMP threads on all of them
and slow each other down far more than half. So the hive gives each CPU
worker its own cores (its CPU affinity, set by the launcher before the
worker's program starts; the worker binds its engine's threads to them):

- ``worker_cores = 0`` (default): a worker gets every core no other worker
  holds; ``worker_cores = N``: N of them.
- When too few cores are free, the worker shares the least used ones, and
  the hive says why and what to change.

The cores to share out are the hive's own (its affinity, capped by its
cgroup's CPU quota), never the machine's count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from rbee.cpus import cpu_budget, format_cpu_list


@dataclass(frozen=True)
class Assignment:
    cores: tuple[int, ...]
    # Whether the cores are the worker's alone.
    exclusive: bool
    # What the hive narrates.
    note: str


class CoreAssigner:
    def __init__(self, available: Iterable[int], per_worker: int = 0) -> None:
        self.available = tuple(sorted(set(available)))
        if not self.available:
            raise ValueError("no cores to assign")
        self.per_worker = max(0, per_worker)
        self._held: dict[str, tuple[int, ...]] = {}

    def held(self) -> dict[str, tuple[int, ...]]:
        return dict(self._held)

    def free(self) -> tuple[int, ...]:
        taken = {c for cores in self._held.values() for c in cores}
        return tuple(c for c in self.available if c not in taken)

    def assign(self, worker_id: str) -> Assignment:
        self.release(worker_id)
        free = self.free()
        want = min(self.per_worker or len(free) or len(self.available), len(self.available))
        if len(free) >= want > 0:
            cores = free[:want]
            self._held[worker_id] = cores
            return Assignment(cores, True, f"cores {format_cpu_list(cores)} (its own; {len(free) - want} left free)")
        # Too few free: share the least used cores (free ones first).
        use = Counter(c for held in self._held.values() for c in held)
        cores = tuple(sorted(sorted(self.available, key=lambda c: (use[c], c))[:want]))
        self._held[worker_id] = cores
        sharers = sorted(w for w, held in self._held.items() if w != worker_id and set(held) & set(cores))
        setting = "worker_cores" if self.per_worker else "worker_cores (0 now: every free core)"
        note = (
            f"cores {format_cpu_list(cores)}, shared with {', '.join(sharers)}: only {len(free)} of the hive's "
            f"{len(self.available)} cores are free and it needs {want}; stop a worker or set the hive's "
            f"{setting} so that workers × cores fits {len(self.available)}"
        )
        return Assignment(cores, False, note)

    def release(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)


def hive_cores(per_worker: int) -> CoreAssigner | None:
    """The assigner for this hive's own cores; None where affinity cannot be set."""
    import os

    if not hasattr(os, "sched_setaffinity"):
        return None
    return CoreAssigner(cpu_budget().cores, per_worker)
