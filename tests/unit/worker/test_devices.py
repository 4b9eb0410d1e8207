"""The device check the worker runs before anything starts (fake GPU facts)."""

from __future__ import annotations

import pytest

from rbee.errors import RbeeError
from rbee_worker.devices import TorchCuda, check_cpu, check_cuda


class FakeDevices:
    def __init__(self, names=None, nvml_error=None, driver="NVRM version: 550.54", torch=None):
        self.names = names or []
        self.nvml_error = nvml_error
        self.driver = driver
        self.torch = torch or TorchCuda(bool(self.names), len(self.names), f"torch sees {len(self.names)} GPU(s)")

    def nvml_devices(self):
        if self.nvml_error:
            raise self.nvml_error
        return list(self.names)

    def driver_version(self):
        return self.driver

    def torch_cuda(self):
        return self.torch


class NVMLError_LibraryNotFound(Exception):
    pass


def test_no_gpu_at_all_names_every_check():
    source = FakeDevices(
        nvml_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"),
        driver=None,
        torch=TorchCuda(False, 0, "torch 2.13.0+cpu is built without CUDA"),
    )
    with pytest.raises(RbeeError) as info:
        check_cuda(0, source)
    err = info.value
    assert err.code == "CUDA_NOT_AVAILABLE"
    assert err.message.startswith("CUDA backend not available")
    for what in ("NVML", "NVML Shared Library Not Found", "driver: not loaded", "torch.cuda", "built without CUDA"):
        assert what in err.message
    assert set(err.details) == {"nvml", "driver", "torch_cuda"}
    assert any("--backend cpu" in s for s in err.suggestions)


def test_gpus_visible_but_torch_without_cuda_is_not_available():
    source = FakeDevices(names=["NVIDIA RTX 3090"], torch=TorchCuda(False, 0, "torch 2.13.0+cpu is built without CUDA"))
    with pytest.raises(RbeeError) as info:
        check_cuda(0, source)
    assert info.value.code == "CUDA_NOT_AVAILABLE"
    assert "1 GPU(s)" in info.value.details["nvml"]


def test_device_out_of_range_lists_the_devices():
    source = FakeDevices(names=["NVIDIA RTX 3090", "NVIDIA RTX 4090"])
    with pytest.raises(RbeeError) as info:
        check_cuda(2, source)
    err = info.value
    assert err.code == "DEVICE_NOT_AVAILABLE"
    assert "0 (NVIDIA RTX 3090), 1 (NVIDIA RTX 4090)" in err.message
    assert err.details["device_count"] == "2"
    assert "--device between 0 and 1" in err.suggestions[0]


def test_valid_device_returns_its_name():
    source = FakeDevices(names=["NVIDIA RTX 3090", "NVIDIA RTX 4090"])
    assert check_cuda(1, source) == "NVIDIA RTX 4090"


def test_cpu_has_only_device_zero():
    check_cpu(0)
    with pytest.raises(RbeeError) as info:
        check_cpu(1)
    assert info.value.code == "INVALID_DEVICE"
