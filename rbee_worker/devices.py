"""Checking the requested device before anything is started or loaded.

`--backend cuda` never falls back to the CPU: without a usable GPU the worker
stops at once and says what it checked (NVML, the kernel driver, torch.cuda).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rbee.errors import RbeeError

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class TorchCuda:
    available: bool
    device_count: int
    detail: str


class DeviceSource(Protocol):
    """Where GPU facts come from (a fake one in tests)."""

    def nvml_devices(self) -> list[str]:
        """GPU names in NVML order; raises with the reason when NVML is unusable."""

    def driver_version(self) -> str | None:
        """The loaded NVIDIA kernel driver, None when none is loaded."""

    def torch_cuda(self) -> TorchCuda: ...

    def capability(self, device: int) -> tuple[int, int]:
        """The device's CUDA compute capability (major, minor); raises when it cannot be read."""


class SystemDevices:
    """The machine's own answers: NVML (nvidia-ml-py), /proc, torch."""

    def nvml_devices(self) -> list[str]:
        import pynvml

        pynvml.nvmlInit()
        try:
            names = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(name.decode() if isinstance(name, bytes) else str(name))
            return names
        finally:
            pynvml.nvmlShutdown()

    def driver_version(self) -> str | None:
        try:
            first = DRIVER_VERSION_FILE.read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return first.strip() or None

    def torch_cuda(self) -> TorchCuda:
        try:
            import torch
        except ImportError as exc:
            return TorchCuda(False, 0, f"torch not importable ({exc})")
        built = torch.version.cuda
        if not built:
            return TorchCuda(False, 0, f"torch {torch.__version__} is built without CUDA")
        if not torch.cuda.is_available():
            return TorchCuda(False, 0, f"torch {torch.__version__} (CUDA {built}) sees no usable GPU")
        count = torch.cuda.device_count()
        return TorchCuda(True, count, f"torch {torch.__version__} (CUDA {built}) sees {count} GPU(s)")


    def capability(self, device: int) -> tuple[int, int]:
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(device))
                return int(major), int(minor)
            finally:
                pynvml.nvmlShutdown()
        except Exception as nvml_exc:  # noqa: BLE001 - try torch next
            try:
                import torch

                major, minor = torch.cuda.get_device_capability(device)
                return int(major), int(minor)
            except Exception as exc:  # noqa: BLE001
                raise RbeeError(
                    "CUDA_NOT_AVAILABLE",
                    f"Cannot read the compute capability of CUDA device {device}: "
                    f"NVML: {type(nvml_exc).__name__}: {nvml_exc}; torch.cuda: {type(exc).__name__}: {exc}",
                    {"device": device},
                    ["Use --backend cpu on this machine", "Or pass --dtype float16 or --dtype bfloat16 explicitly"],
                ) from None


def _describe(names: list[str]) -> str:
    return ", ".join(f"{i} ({name})" for i, name in enumerate(names)) or "none"


def check_cuda(device: int, source: DeviceSource) -> str:
    """The name of CUDA device ``device``, or RbeeError saying why it cannot be used."""
    try:
        names = source.nvml_devices()
        nvml = f"{len(names)} GPU(s)" if names else "no GPUs"
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no usable NVML"
        names = []
        nvml = f"unavailable ({type(exc).__name__}: {exc})"
    driver = source.driver_version()
    torch_state = source.torch_cuda()
    checks = {
        "nvml": nvml,
        "driver": driver or f"not loaded ({DRIVER_VERSION_FILE} missing)",
        "torch_cuda": torch_state.detail,
    }
    if not names or not torch_state.available:
        raise RbeeError(
            "CUDA_NOT_AVAILABLE",
            "CUDA backend not available: checked NVML: {nvml}; driver: {driver}; torch.cuda: {torch_cuda}".format(
                **checks
            ),
            checks,
            [
                "Use --backend cpu on this machine",
                "On a CUDA machine: install the NVIDIA driver and the CUDA build of the worker (rbee[cuda])",
            ],
        )
    if not 0 <= device < len(names):
        raise RbeeError(
            "DEVICE_NOT_AVAILABLE",
            f"CUDA device {device} does not exist; available devices: {_describe(names)}",
            {"device": device, "device_count": len(names), "available": _describe(names)},
            [f"Use --device between 0 and {len(names) - 1}"],
        )
    return names[device]


def check_cpu(device: int) -> None:
    if device != 0:
        raise RbeeError(
            "INVALID_DEVICE",
            f"The cpu backend has one device, 0 (got --device {device})",
            {"backend": "cpu", "device": device},
            ["Use --device 0 with --backend cpu"],
        )
