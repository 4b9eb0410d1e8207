"""NVIDIA GPUs through NVML (nvidia-ml-py), never by parsing nvidia-smi.

The module object is injectable so the GPU path is tested with a fake NVML
on machines without a GPU. Every NVML failure becomes "no CUDA here, and why".
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    vram_total_bytes: int
    vram_available_bytes: int


@dataclass(frozen=True)
class CudaProbe:
    available: bool
    gpus: tuple[GpuInfo, ...] = ()
    # Why CUDA is unavailable (driver missing, no devices, ...), or the driver version.
    detail: str = ""


def _load_pynvml() -> ModuleType | None:
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    return pynvml


class Nvml:
    """Queries NVML; each probe initialises and shuts NVML down again so a
    driver installed or removed while the hive runs is noticed."""

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self._lock = threading.Lock()

    def _nvml(self) -> Any:
        if self._module is None:
            self._module = _load_pynvml() or False
        return self._module or None

    def probe(self) -> CudaProbe:
        nvml = self._nvml()
        if nvml is None:
            return CudaProbe(False, detail="nvidia-ml-py is not installed (no NVML bindings)")
        with self._lock:
            try:
                nvml.nvmlInit()
            except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                return CudaProbe(False, detail=f"NVIDIA driver not found (NVML: {_describe(exc)})")
            try:
                return self._read(nvml)
            except Exception as exc:
                log.warning("NVML query failed: %s", _describe(exc))
                return CudaProbe(False, detail=f"NVML query failed: {_describe(exc)}")
            finally:
                try:
                    nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down is best effort
                    pass

    def process_memory(self, device: int, pids: set[int]) -> int | None:
        """Device memory the processes ``pids`` hold on GPU ``device`` now
        (NVML's per-process figure for compute processes); None when NVML
        cannot say (no driver, an old one, or a process in another PID
        namespace, whose pid NVML does not report as ours)."""
        nvml = self._nvml()
        if nvml is None:
            return None
        with self._lock:
            try:
                nvml.nvmlInit()
            except Exception:  # noqa: BLE001 - no driver: nothing to measure
                return None
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(device)
                used = [p.usedGpuMemory for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) if int(p.pid) in pids]
            except Exception as exc:  # noqa: BLE001
                log.info("NVML per-process memory of GPU %d not available: %s", device, _describe(exc))
                return None
            finally:
                try:
                    nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down is best effort
                    pass
        known = [int(u) for u in used if u is not None]
        return sum(known) if known else None

    @staticmethod
    def _read(nvml: Any) -> CudaProbe:
        count = int(nvml.nvmlDeviceGetCount())
        driver = nvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(index, name, int(mem.total), int(mem.free)))
        if not gpus:
            return CudaProbe(False, detail=f"NVIDIA driver {driver} reports no GPUs")
        return CudaProbe(True, tuple(gpus), detail=f"NVIDIA driver {driver}")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text
