"""The GPU path with a fake NVML (there is no GPU on the test machines), and detection."""

from types import SimpleNamespace

from rbee_hive.detect import detect
from rbee_hive.nvml import CudaProbe, GpuInfo, Nvml
from rbee_hive.resources import SystemResources

GB = 1024**3


class FakeNvml:
    def __init__(self, gpus=(), fail_init=None, fail_query=None):
        self.gpus = list(gpus)
        self.fail_init = fail_init
        self.fail_query = fail_query
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        if self.fail_query:
            raise self.fail_query
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self):
        return b"550.54"

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.gpus[h][1], free=self.gpus[h][2], used=self.gpus[h][1] - self.gpus[h][2])


def test_two_gpus_through_nvml():
    fake = FakeNvml([("RTX 3090", 24 * GB, 20 * GB), ("RTX 3060", 12 * GB, 1 * GB)])
    probe = Nvml(fake).probe()
    assert probe.available
    assert probe.gpus == (GpuInfo(0, "RTX 3090", 24 * GB, 20 * GB), GpuInfo(1, "RTX 3060", 12 * GB, 1 * GB))
    assert "550.54" in probe.detail
    assert fake.inits == fake.shutdowns == 1  # NVML is released after each probe


def test_no_driver_is_a_clear_unavailable():
    class NVMLError_LibraryNotFound(Exception):
        def __str__(self):
            return "NVML Shared Library Not Found"

    probe = Nvml(FakeNvml(fail_init=NVMLError_LibraryNotFound())).probe()
    assert probe == CudaProbe(False, (), "NVIDIA driver not found (NVML: NVML Shared Library Not Found)")


def test_driver_without_gpus_and_failing_queries():
    assert not Nvml(FakeNvml([])).probe().available
    assert "no GPUs" in Nvml(FakeNvml([])).probe().detail
    broken = Nvml(FakeNvml([("x", 1, 1)], fail_query=RuntimeError("GPU is lost"))).probe()
    assert not broken.available and "GPU is lost" in broken.detail


def test_real_nvml_on_this_machine_fails_fast_with_a_reason():
    probe = Nvml().probe()
    if probe.available:  # a machine with a GPU: the figures must be real
        assert all(g.vram_total_bytes > 0 for g in probe.gpus)
    else:
        assert probe.detail  # says why: bindings missing or driver not found


def test_detect_registry_and_human_forms_with_cuda():
    source = SystemResources(Nvml(FakeNvml([("A", 8 * GB, 8 * GB), ("B", 8 * GB, 8 * GB)])))
    d = detect(source, system="Linux", machine="x86_64")
    assert d.registry_form() == {"backends": ["cpu", "cuda"], "devices": {"cpu": 1, "cuda": 2}}
    assert d.registry_lines() == ['backends: ["cpu", "cuda"]', 'devices: {"cpu": 1, "cuda": 2}']
    human = "\n".join(d.human_lines())
    assert "cuda: 2 devices [0, 1]" in human
    assert "metal: not available" in human


def test_detect_without_gpu_and_metal_on_apple_silicon():
    source = SystemResources(Nvml(FakeNvml(fail_init=RuntimeError("Driver Not Loaded"))))
    linux = detect(source, system="Linux", machine="x86_64")
    assert linux.registry_form() == {"backends": ["cpu"], "devices": {"cpu": 1}}
    assert "Driver Not Loaded" in linux.get("cuda").detail
    mac = detect(source, system="Darwin", machine="arm64")
    assert mac.registry_form() == {"backends": ["cpu", "metal"], "devices": {"cpu": 1, "metal": 1}}
    intel_mac = detect(source, system="Darwin", machine="x86_64")
    assert not intel_mac.get("metal").available
