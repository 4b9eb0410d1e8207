"""The hive's RAM check counts the weights in the dtype the worker will choose
(pinned /proc/cpuinfo flags): float32 doubles a bfloat16 model, bfloat16 where
float32 would not fit."""

import json
from pathlib import Path

import pytest

from rbee.cpus import cpu_flags
from rbee.errors import RbeeError
from rbee_hive.preflight import MB, check_worker, estimate_memory
from tests.unit.hive.test_preflight import CPU_ONLY, res

AVX2 = cpu_flags("flags\t\t: fpu sse2 avx avx2 fma\n")
ZEN4 = cpu_flags("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
SIZE = 1000 * MB


@pytest.fixture
def bf16_model(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    return tmp_path


def test_float32_on_a_cpu_without_bf16_doubles_the_need(bf16_model):
    memory = estimate_memory(bf16_model, "cpu", SIZE, 64_000 * MB, cpu_flags=AVX2)
    assert memory.bytes == 2 * SIZE and memory.dtype.dtype == "float32"
    checks = check_worker(CPU_ONLY, res(ram=64_000 * MB), "cpu", 0, SIZE, memory=memory)
    ram = checks[-1]
    assert ram.required_bytes == 2400 * MB
    assert ram.note == "dtype float32: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"


def test_bfloat16_where_float32_would_not_fit(bf16_model):
    memory = estimate_memory(bf16_model, "cpu", SIZE, 2000 * MB, cpu_flags=AVX2)
    assert memory.bytes == SIZE and memory.dtype.dtype == "bfloat16"
    assert "float32 would need 2400 MB and 2000 MB are available" in memory.dtype.reason
    assert check_worker(CPU_ONLY, res(ram=2000 * MB), "cpu", 0, SIZE, memory=memory)[-1].required_bytes == 1200 * MB


def test_native_bf16_keeps_the_size_and_too_little_ram_says_the_dtype(bf16_model):
    memory = estimate_memory(bf16_model, "cpu", SIZE, 500 * MB, cpu_flags=ZEN4)
    assert memory.bytes == SIZE and memory.dtype.dtype == "bfloat16"
    with pytest.raises(RbeeError) as exc:
        check_worker(CPU_ONLY, res(ram=500 * MB), "cpu", 0, SIZE, memory=memory)
    assert exc.value.code == "INSUFFICIENT_RAM"
    assert "model 1000 MB × 1.2" in exc.value.message


def test_the_hives_worker_dtype_and_models_without_a_dtype(bf16_model, tmp_path):
    forced = estimate_memory(bf16_model, "cpu", SIZE, 64_000 * MB, override="float32", cpu_flags=ZEN4)
    assert forced.bytes == 2 * SIZE and forced.dtype.line() == "float32: set by the hive's worker_dtype"
    bare = tmp_path / "no-config"
    bare.mkdir()
    assert estimate_memory(bare, "cpu", SIZE, 64_000 * MB, cpu_flags=AVX2).bytes == SIZE  # nothing to scale from
