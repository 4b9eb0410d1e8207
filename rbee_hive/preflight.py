"""Worker resource preflight (S4.3): backend, device, disk, RAM, VRAM.

Fail fast with the first failing check, its stable code and its figures.
Never falls back from a GPU to the CPU: the user picks the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rbee.cpus import read_cpu_flags
from rbee.dtype import AUTO, BYTES, DtypeChoice, choose_dtype, model_facts, normalize, weights_bytes
from rbee.errors import RbeeError
from rbee_hive.detect import BACKEND_NAMES, Detection
from rbee_hive.resources import Resources

# Loading a model takes more memory than its files: weights plus runtime buffers.
MEMORY_FACTOR = 1.2
MB = 1024 * 1024


def to_mb(n: int | float) -> int:
    return int(math.ceil(n / MB))


def required_memory_bytes(model_size_bytes: int) -> int:
    return int(math.ceil(model_size_bytes * MEMORY_FACTOR))


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    # The figures in bytes (ResourceCheck.required_bytes / available_bytes); 0 where they do not apply.
    required_bytes: int = 0
    available_bytes: int = 0
    message: str = ""
    # What the figure assumed (the ram check: the dtype the worker will run in, and why).
    note: str = ""


def model_size(path: Path) -> int:
    """Bytes of a model file or folder (hidden files such as import markers count too)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise RbeeError(
            "MODEL_NOT_FOUND",
            f"Model not found on this node: {path}",
            {"model_path": str(path)},
            ["Check the path, or download the model first (rbee-keeper models download MODEL --node NODE)"],
        )
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_backend(detection: Detection, backend: str) -> Check:
    if backend not in BACKEND_NAMES:
        raise RbeeError(
            "INVALID_BACKEND",
            f"Unknown backend {backend!r}: choose one of {', '.join(BACKEND_NAMES)}",
            {"backend": backend, "accepted": ", ".join(BACKEND_NAMES)},
            ["Pass --backend cpu, --backend cuda or --backend metal"],
        )
    info = detection.get(backend)
    available = [b.name for b in detection.available]
    if info is None or not info.available:
        what = "CUDA" if backend == "cuda" else backend
        reason = f" ({info.detail})" if info is not None and info.detail else ""
        suggestions = [f"Choose one of the available backends explicitly: {', '.join(available)}"]
        if backend == "cuda":
            suggestions.insert(0, "Install the NVIDIA driver and CUDA on this node (https://developer.nvidia.com/cuda-downloads)")
        raise RbeeError(
            "BACKEND_UNAVAILABLE",
            f"{what} requested but not available on this node{reason}. Available: {available}",
            {"backend": backend, "available": ", ".join(available), "reason": info.detail if info else ""},
            suggestions,
        )
    return Check("backend", True, message=f"{backend} available ({info.device_count} device(s))")


def check_device(detection: Detection, backend: str, device: int) -> Check:
    info = detection.get(backend)
    devices = info.devices if info else []
    if device not in devices:
        raise RbeeError(
            "DEVICE_NOT_AVAILABLE",
            f"Device {device} not available. Available: {devices}",
            {"backend": backend, "device": device, "available": str(devices)},
            [f"Pick a device from {devices} for {backend} (rbee-hive detect lists them)"],
        )
    return Check("device", True, message=f"{backend}:{device} present")


def check_disk(res: Resources, model_size_bytes: int) -> Check:
    need, free = model_size_bytes, res.disk_available_bytes
    if free < need:
        raise RbeeError(
            "INSUFFICIENT_DISK",
            f"Not enough disk for the model at {res.disk_path}: need {to_mb(need)} MB, "
            f"{to_mb(free)} MB free; free at least {to_mb(need - free)} MB",
            {
                "required_mb": to_mb(need),
                "available_mb": free // MB,
                "to_free_mb": to_mb(need - free),
                "path": res.disk_path,
            },
            ["Remove models you no longer need: rbee-keeper models rm MODEL --node NODE", f"Or free space on {res.disk_path}"],
        )
    return Check("disk", True, need, free, f"{free // MB} MB free at {res.disk_path}")


@dataclass(frozen=True)
class MemoryEstimate:
    """The model's weights in memory in the dtype its worker will run (rbee/dtype.py)."""

    bytes: int
    # None where the dtype is not known before the worker starts (a GPU's own choice).
    dtype: DtypeChoice | None = None

    def describe(self, model_size_bytes: int) -> str:
        if self.dtype is None or self.bytes == model_size_bytes:
            what = f"model {to_mb(model_size_bytes)} MB"
        else:
            what = f"model {to_mb(model_size_bytes)} MB on disk, {to_mb(self.bytes)} MB in {self.dtype.dtype}"
        return f"{what} × {MEMORY_FACTOR}"


def estimate_memory(
    model_path: Path, backend: str, model_size_bytes: int, ram_available: int,
    override: str = AUTO, cpu_flags: frozenset[str] | None = None,
) -> MemoryEstimate:  # fmt: skip
    """What the worker will hold: on CPU the dtype chosen as the worker will
    choose it (float32 doubles a bfloat16 model's weights; bfloat16 where
    float32 would not fit). Sizes scale only when config.json names the dtype."""
    facts = model_facts(model_path)
    known = facts.dtype_known
    if backend != "cpu":
        chosen = normalize(override)
        if chosen == AUTO or not known:
            return MemoryEstimate(model_size_bytes)
        return MemoryEstimate(weights_bytes(model_size_bytes, facts.dtype, chosen), DtypeChoice(chosen, "set by worker_dtype"))
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    need = {d: required_memory_bytes(weights_bytes(model_size_bytes, facts.dtype, d) if known else model_size_bytes) for d in BYTES}
    choice = choose_dtype(
        "cpu", facts.dtype, cpu_flags=flags, override=override, override_source="the hive's worker_dtype",
        need_bytes=need if known else None, available_bytes=ram_available,
    )  # fmt: skip
    size = weights_bytes(model_size_bytes, facts.dtype, choice.dtype) if known else model_size_bytes
    return MemoryEstimate(size, choice)


def check_ram(res: Resources, model_size_bytes: int, memory: MemoryEstimate | None = None) -> Check:
    memory = memory or MemoryEstimate(model_size_bytes)
    need, have = required_memory_bytes(memory.bytes), res.ram_available_bytes
    if have < need:
        raise RbeeError(
            "INSUFFICIENT_RAM",
            f"Not enough RAM for the model: requires {to_mb(need)} MB "
            f"({memory.describe(model_size_bytes)}), {have // MB} MB available",
            {
                "required_mb": to_mb(need),
                "available_mb": have // MB,
                "model_size_mb": to_mb(model_size_bytes),
                "total_mb": res.ram_total_bytes // MB,
            },
            ["Stop other workers on this node (rbee-keeper workers shutdown --id ID)", "Or use a smaller model or another node"],
        )
    note = f"dtype {memory.dtype.line()}" if memory.dtype is not None else ""
    message = f"{have // MB} MB available" + (f"; {note}" if note else "")
    return Check("ram", True, need, have, message, note)


def check_vram(res: Resources, device: int, model_size_bytes: int) -> Check:
    gpu = next((g for g in res.gpus if g.index == device), None)
    need = required_memory_bytes(model_size_bytes)
    have = gpu.vram_available_bytes if gpu else 0
    if have < need:
        raise RbeeError(
            "VRAM_EXHAUSTED",
            f"Not enough VRAM on cuda:{device}: requires {to_mb(need)} MB, {have // MB} MB available",
            {
                "device": device,
                "required_mb": to_mb(need),
                "available_mb": have // MB,
                "total_mb": (gpu.vram_total_bytes // MB) if gpu else 0,
            },
            [
                "Stop workers using this GPU (rbee-keeper workers list / shutdown --id ID)",
                "Or choose another device with enough free VRAM, or a smaller model",
            ],
        )
    return Check("vram", True, need, have, f"{gpu.name if gpu else ''} {have // MB} MB free".strip())


def check_worker(
    detection: Detection,
    res: Resources,
    backend: str,
    device: int,
    model_size_bytes: int,
    needs_download: bool = False,
    memory: MemoryEstimate | None = None,
) -> list[Check]:
    """Every check in order; raises the first failure. ``memory``: the model's
    size in the dtype the worker will run (estimate_memory), else its files'."""
    checks = [check_backend(detection, backend), check_device(detection, backend, device)]
    if needs_download:
        checks.append(check_disk(res, model_size_bytes))
    if backend == "cpu":
        checks.append(check_ram(res, model_size_bytes, memory))
    else:
        checks.append(check_ram(res, model_size_bytes))
    if backend == "cuda":
        checks.append(check_vram(res, device, memory.bytes if memory is not None else model_size_bytes))
    return checks
