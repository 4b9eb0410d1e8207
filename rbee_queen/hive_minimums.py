"""The hive preflight's floor (docs/behaviour.md S4.2, docs/queen.md "Hive
preflight: the smallest node"): free RAM and free disk a node must have
before the queen starts workers of a backend there.

GPU backends (cuda, metal) default to 8 GiB of free RAM and 50 GiB of free
disk: the host holds a GPU model's weights while they move to the device, and
GPU models and their environments are large. The CPU backend defaults to
3 GiB of free RAM (the CPU worker's engine, about 2 GiB, and the 1 GiB KV
cache it reserves, before any weights) and 5 GiB of free disk (the CPU
worker environment, about 2.6 GB, and a small model). Each figure is a queen
setting; 0 turns that check off.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rbee.errors import RbeeError
from rbee.fit import GiB, MiB, gib

GPU_BACKENDS = ("cuda", "metal")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_FACTORS = {"b": 1, "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024 * GiB,
            "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip


def parse_size(value: Any) -> Any:
    """Bytes as a number, or text with a unit ("3GiB", "512 MiB", "50GB").
    Anything else is left to pydantic, which refuses it naming the setting."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _FACTORS[(match.group(2) or "b").lower()])
    return value


@dataclass(frozen=True)
class Minimum:
    """The floor for one backend, and the settings that set it."""

    backend: str
    ram_bytes: int
    disk_bytes: int
    ram_setting: str
    disk_setting: str


def minimum_for(settings: Any, backend: str) -> Minimum:
    """The floor for ``backend`` from the queen's settings (cpu or a GPU backend)."""
    kind = "gpu" if backend in GPU_BACKENDS else "cpu"
    return Minimum(
        backend,
        int(getattr(settings, f"hive_min_ram_{kind}")),
        int(getattr(settings, f"hive_min_disk_{kind}")),
        f"hive_min_ram_{kind}",
        f"hive_min_disk_{kind}",
    )


def shortfall(minimum: Minimum, ram_available: int, disk_available: int) -> str | None:
    """What the node lacks for ``minimum``, or None when it has enough."""
    short = []
    if ram_available < minimum.ram_bytes:
        short.append(f"{gib(ram_available)} of RAM free, needs {gib(minimum.ram_bytes)}")
    if disk_available < minimum.disk_bytes:
        short.append(f"{gib(disk_available)} of disk free, needs {gib(minimum.disk_bytes)}")
    return "; ".join(short) or None


def check_minimums(
    settings: Any,
    node: str,
    res: Any,
    available: Sequence[str],
    backend: str | None,
    check: Callable[..., None],
) -> None:
    """The floor check of the hive preflight. With ``backend`` (a task's),
    that backend's floor must hold. Without one (``setup check-node``), the
    node must meet the floor of at least one backend it has; a backend whose
    floor it misses is a warning. The first refusal raises
    INSUFFICIENT_RAM or INSUFFICIENT_DISK with the figures."""
    ram, disk = int(res.ram_available_bytes), int(res.disk_available_bytes)
    floors = {b: minimum_for(settings, b) for b in ([backend] if backend else available)}
    verdicts = {b: shortfall(m, ram, disk) for b, m in floors.items()}
    met = [b for b, why in verdicts.items() if why is None]
    if met:
        for b, why in verdicts.items():
            if why is not None:
                check("hive_minimums", True, f"Node {node} is below the minimum for {b} workers ({why})", warning=True)
        held = ", ".join(f"{b}: {gib(floors[b].ram_bytes)} RAM, {gib(floors[b].disk_bytes)} disk" for b in met)
        check("hive_minimums", True, f"Free RAM and disk above the minimum ({held})")
        return
    # Refused: name the backend whose floor is the lowest (the easiest to reach).
    minimum = min(floors.values(), key=lambda m: (m.ram_bytes, m.disk_bytes))
    check("hive_minimums", False, f"Node {node} is below the minimum for {minimum.backend} workers: {verdicts[minimum.backend]}")
    raise _refusal(node, minimum, ram, disk, res.disk_path)


def _refusal(node: str, minimum: Minimum, ram: int, disk: int, disk_path: str) -> RbeeError:
    lower = "Or, if the node is meant to run such workers anyway, lower the queen's floor: {setting} in the [queen] " \
            "section of the config file (RBEE_QUEEN_{env}; a size such as 2GiB, 0 turns the check off), " \
            "then restart `queen-rbee daemon`"  # fmt: skip
    details = {"node": node, "backend": minimum.backend, "ram_available_mb": ram // MiB, "disk_available_mb": disk // MiB,
               "ram_required_mb": minimum.ram_bytes // MiB, "disk_required_mb": minimum.disk_bytes // MiB,
               "disk_path": disk_path}  # fmt: skip
    if ram < minimum.ram_bytes:
        return RbeeError(
            "INSUFFICIENT_RAM",
            f"Node {node} has {gib(ram)} of RAM free; {minimum.backend} workers need at least "
            f"{gib(minimum.ram_bytes)} (required {minimum.ram_bytes // MiB} MB, available {ram // MiB} MB)",
            details,
            [f"Free memory on {node}: see its workers with `rbee-keeper workers list --node {node}` and stop one "
             f"with `rbee-keeper workers shutdown --node {node} --id WORKER_ID`",
             lower.format(setting=minimum.ram_setting, env=minimum.ram_setting.upper())],
        )  # fmt: skip
    return RbeeError(
        "INSUFFICIENT_DISK",
        f"Node {node} has {gib(disk)} free at {disk_path}; {minimum.backend} workers need at least "
        f"{gib(minimum.disk_bytes)} (free {(minimum.disk_bytes - disk) // MiB} MB more)",
        details | {"to_free_mb": (minimum.disk_bytes - disk) // MiB},
        [f"Remove models you no longer need: `rbee-keeper models list --node {node}`, then "
         f"`rbee-keeper models rm MODEL --node {node}`",
         lower.format(setting=minimum.disk_setting, env=minimum.disk_setting.upper())],
    )  # fmt: skip
