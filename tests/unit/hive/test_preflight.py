"""Each worker resource check, both sides of its boundary, with the figures."""

import pytest

from rbee.errors import RbeeError
from rbee_hive.detect import BackendInfo, Detection
from rbee_hive.nvml import GpuInfo
from rbee_hive.preflight import MB, check_worker, model_size, required_memory_bytes
from rbee_hive.resources import Resources

CPU_ONLY = Detection((BackendInfo("cpu", True, 1), BackendInfo("cuda", False, 0, "NVIDIA driver not found"), BackendInfo("metal", False, 0)))
TWO_GPUS = Detection((BackendInfo("cpu", True, 1), BackendInfo("cuda", True, 2, "driver 550"), BackendInfo("metal", False, 0)))
SIZE = 1000 * MB  # needs 1200 MB of RAM / VRAM


def res(ram=64_000 * MB, disk=500_000 * MB, vram=(24_000 * MB, 24_000 * MB)):
    gpus = tuple(GpuInfo(i, f"GPU{i}", 24_000 * MB, v) for i, v in enumerate(vram))
    return Resources(128_000 * MB, ram, "/models", 1_000_000 * MB, disk, gpus)


def refused(*args, **kwargs) -> RbeeError:
    with pytest.raises(RbeeError) as exc:
        check_worker(*args, **kwargs)
    return exc.value


def test_required_memory_is_size_times_1_2():
    assert required_memory_bytes(SIZE) == 1200 * MB


def test_ram_boundary():
    checks = check_worker(CPU_ONLY, res(ram=1200 * MB), "cpu", 0, SIZE)
    ram = next(c for c in checks if c.name == "ram")
    assert (ram.required_bytes, ram.available_bytes) == (1200 * MB, 1200 * MB)
    err = refused(CPU_ONLY, res(ram=1200 * MB - 1), "cpu", 0, SIZE)
    assert err.code == "INSUFFICIENT_RAM"
    assert err.details["required_mb"] == "1200" and err.details["available_mb"] == "1199"
    assert "1200 MB" in err.message and "1199 MB" in err.message
    assert err.suggestions


def test_vram_boundary_on_the_chosen_device():
    ok = check_worker(TWO_GPUS, res(vram=(100 * MB, 1200 * MB)), "cuda", 1, SIZE)
    assert [c.name for c in ok] == ["backend", "device", "ram", "vram"]
    err = refused(TWO_GPUS, res(vram=(24_000 * MB, 1200 * MB - 1)), "cuda", 1, SIZE)
    assert err.code == "VRAM_EXHAUSTED"
    assert (err.details["required_mb"], err.details["available_mb"], err.details["device"]) == ("1200", "1199", "1")
    assert "cuda:1" in err.message


def test_disk_only_checked_before_a_download():
    assert [c.name for c in check_worker(CPU_ONLY, res(disk=0), "cpu", 0, SIZE)] == ["backend", "device", "ram"]
    ok = check_worker(CPU_ONLY, res(disk=SIZE), "cpu", 0, SIZE, needs_download=True)
    assert any(c.name == "disk" for c in ok)
    err = refused(CPU_ONLY, res(disk=SIZE - 300 * MB), "cpu", 0, SIZE, needs_download=True)
    assert err.code == "INSUFFICIENT_DISK"
    assert err.details["to_free_mb"] == "300" and err.details["required_mb"] == "1000"
    assert any("rbee-keeper models rm" in s for s in err.suggestions)


def test_cuda_without_cuda_never_falls_back_to_cpu():
    err = refused(CPU_ONLY, res(), "cuda", 0, SIZE)
    assert err.code == "BACKEND_UNAVAILABLE"
    assert "CUDA" in err.message and "not available" in err.message and "['cpu']" in err.message
    assert err.details["available"] == "cpu"
    assert "NVIDIA driver not found" in err.message


def test_unknown_backend_and_device_out_of_range():
    assert refused(CPU_ONLY, res(), "rocm", 0, SIZE).code == "INVALID_BACKEND"
    err = refused(TWO_GPUS, res(), "cuda", 5, SIZE)
    assert err.code == "DEVICE_NOT_AVAILABLE"
    assert err.message == "Device 5 not available. Available: [0, 1]"
    assert refused(CPU_ONLY, res(), "cpu", 1, SIZE).message == "Device 1 not available. Available: [0]"


def test_model_size_of_folders_files_and_missing_paths(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 24)
    assert model_size(tmp_path) == 1024
    assert model_size(tmp_path / "a.safetensors") == 1000
    with pytest.raises(RbeeError) as exc:
        model_size(tmp_path / "missing")
    assert exc.value.code == "MODEL_NOT_FOUND"
