"""The ResourceSource seam: RAM, disk of the model store, GPUs.

The system source reads psutil and NVML. An override file (JSON, read on every
query) can pin any of the figures: operators use it to reserve headroom, tests
use it to drive a real hive process through both sides of every check.

Override file keys (all optional; a missing key keeps the real figure)::

    {"ram_total_bytes": N, "ram_available_bytes": N,
     "disk_total_bytes": N, "disk_available_bytes": N,
     "gpus": [{"index": 0, "name": "...", "vram_total_bytes": N, "vram_available_bytes": N}],
     "cuda_detail": "why CUDA is (un)available"}

``"gpus": []`` pins "no GPU"; a non-empty list pins CUDA as available with those devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import psutil

from rbee.errors import RbeeError
from rbee_hive.nvml import CudaProbe, GpuInfo, Nvml


@dataclass(frozen=True)
class Resources:
    ram_total_bytes: int
    ram_available_bytes: int
    disk_path: str
    disk_total_bytes: int
    disk_available_bytes: int
    gpus: tuple[GpuInfo, ...]
    overridden: bool = False


class ResourceSource(Protocol):
    def cuda(self) -> CudaProbe: ...

    def snapshot(self, disk_path: Path) -> Resources: ...


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists (the model store may not exist yet)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class SystemResources:
    def __init__(self, nvml: Nvml | None = None) -> None:
        self._nvml = nvml or Nvml()

    def cuda(self) -> CudaProbe:
        return self._nvml.probe()

    def snapshot(self, disk_path: Path) -> Resources:
        mem = psutil.virtual_memory()
        where = existing_ancestor(disk_path)
        disk = psutil.disk_usage(str(where))
        return Resources(
            ram_total_bytes=int(mem.total),
            ram_available_bytes=int(mem.available),
            disk_path=str(where),
            disk_total_bytes=int(disk.total),
            disk_available_bytes=int(disk.free),
            gpus=self.cuda().gpus,
        )


_INT_KEYS = ("ram_total_bytes", "ram_available_bytes", "disk_total_bytes", "disk_available_bytes")


class OverriddenResources:
    """Figures from a JSON file on top of another source."""

    def __init__(self, path: Path, inner: ResourceSource) -> None:
        self.path = Path(path)
        self._inner = inner

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise RbeeError(
                "INVALID_ARGUMENT",
                f"Resource override file not found: {self.path}",
                {"path": str(self.path)},
                ["Unset RBEE_HIVE_RESOURCE_OVERRIDES or create the file"],
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RbeeError(
                "INVALID_ARGUMENT",
                f"Cannot read resource override file {self.path}: {exc}",
                {"path": str(self.path)},
                ["Fix the JSON in the file or unset RBEE_HIVE_RESOURCE_OVERRIDES"],
            ) from None
        if not isinstance(data, dict):
            raise RbeeError("INVALID_ARGUMENT", f"Resource override file {self.path} must hold a JSON object")
        return data

    def _gpus(self, data: dict[str, Any]) -> tuple[GpuInfo, ...] | None:
        if "gpus" not in data:
            return None
        try:
            return tuple(
                GpuInfo(
                    int(g.get("index", i)),
                    str(g.get("name", f"GPU {i}")),
                    int(g["vram_total_bytes"]),
                    int(g["vram_available_bytes"]),
                )
                for i, g in enumerate(data["gpus"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RbeeError(
                "INVALID_ARGUMENT",
                f"Bad 'gpus' entry in {self.path}: {exc}",
                {"path": str(self.path)},
                ["Each GPU needs vram_total_bytes and vram_available_bytes"],
            ) from None

    def cuda(self) -> CudaProbe:
        data = self._read()
        gpus = self._gpus(data)
        if gpus is None:
            return self._inner.cuda()
        detail = str(data.get("cuda_detail") or f"pinned by {self.path}")
        return CudaProbe(bool(gpus), gpus, detail if gpus else f"no GPUs ({detail})")

    def snapshot(self, disk_path: Path) -> Resources:
        data = self._read()
        base = self._inner.snapshot(disk_path)
        changes: dict[str, Any] = {}
        for key in _INT_KEYS:
            if key in data:
                try:
                    changes[key] = int(data[key])
                except (TypeError, ValueError):
                    raise RbeeError("INVALID_ARGUMENT", f"{key} in {self.path} must be a whole number of bytes") from None
        gpus = self._gpus(data)
        if gpus is not None:
            changes["gpus"] = gpus
        return replace(base, overridden=bool(changes), **changes)


def resource_source(overrides: Path | None) -> ResourceSource:
    system = SystemResources()
    return OverriddenResources(overrides, system) if overrides else system

