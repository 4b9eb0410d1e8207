"""The worker's engine settings from pinned hardware figures: dtype, threads, KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rbee.cpus import CpuBudget, cpu_flags
from rbee.dtype import MB
from rbee_worker.engine_plan import KV_CACHE_FLOOR, kv_cache_bytes, plan_engine, plan_fields
from rbee.dtype import model_facts

AVX2 = cpu_flags("flags\t\t: fpu sse2 avx avx2 fma\n")
ZEN4 = cpu_flags("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
SMOL = {"dtype": "bfloat16", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * (4 * MB))
    return tmp_path


def plan(model: Path, **kw):
    args = dict(slots=8, max_model_len=2048, cpu_flags=AVX2, budget=CpuBudget((0, 1), None), environ={})
    args.update(kw)
    return plan_engine(model, "cpu", **args)


def test_cpu_plan_binds_threads_to_the_affinity_and_sizes_the_kv_cache(model: Path):
    p = plan(model, budget=CpuBudget((2, 3, 6, 7), 3.0))
    assert p.dtype.line() == "float32: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"
    # The quota pays for 3 of the 4 cores; one of them is left to the scheduler.
    assert (p.threads, p.cpu_set) == (2, "2-3")
    assert p.env == {"VLLM_CPU_OMP_THREADS_BIND": "2-3"}
    per_token = 2 * 30 * 3 * 64 * 4
    assert p.kv_cache_bytes == -(-8 * 2048 * per_token // MB) * MB
    lines = p.stage_lines()
    assert lines[0] == "dtype float32: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"
    assert "2 thread(s) on cores 2-3, core 6 left to the engine's scheduler" in lines[1]
    assert "(affinity 2-3,6-7, cgroup quota 3 CPUs)" in lines[1]
    assert f"8 slots × 2048 tokens × {per_token} bytes" in lines[2]


def test_native_bf16_halves_the_kv_cache(model: Path):
    p = plan(model, cpu_flags=ZEN4)
    assert p.dtype.dtype == "bfloat16"
    assert p.kv_cache_bytes == -(-8 * 2048 * 2 * 30 * 3 * 64 * 2 // MB) * MB


def test_kv_cache_floor_and_unknown_models(model: Path, tmp_path: Path):
    assert kv_cache_bytes(model_facts(model), 1, 16, "float32") == KV_CACHE_FLOOR
    assert kv_cache_bytes(model_facts(tmp_path / "none"), 8, 2048, "float32") == 1024 * MB


def test_the_operators_environment_wins(model: Path):
    p = plan(model, environ={"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "2"})
    assert p.env == {}
    assert (p.threads, p.cpu_set) == (1, "0")
    auto = plan(model, environ={"VLLM_CPU_OMP_THREADS_BIND": "auto"})
    assert (auto.threads, auto.cpu_set) == (0, "")  # vLLM's own binding: not known here
    assert p.kv_cache_bytes is None
    assert "VLLM_CPU_KVCACHE_SPACE=2 GiB (set in the environment)" in p.stage_lines()[2]


def test_float32_that_would_not_fit_runs_in_bfloat16(model: Path):
    # 4 MB of bfloat16 weights: float32 needs 8 MB × 1.2 + the KV cache (its 64 MB floor)
    # = 73.6 MB, bfloat16 4.8 + 64 = 68.8 MB.
    p = plan(model, slots=1, max_model_len=16, available_bytes=70 * MB)
    assert p.dtype.dtype == "bfloat16"
    assert "float32 would need 73 MB and 70 MB are available" in p.dtype.reason
    assert plan(model, slots=1, max_model_len=16, available_bytes=1000 * MB).dtype.dtype == "float32"


def test_override(model: Path):
    p = plan(model, override="bfloat16")
    assert p.dtype.line() == "bfloat16: set by --dtype"


def test_cuda_plan_has_no_cpu_settings(model: Path):
    p = plan_engine(model, "cuda", slots=32, max_model_len=2048, capability=(7, 5))
    assert p.dtype.dtype == "float16" and p.env == {} and p.threads == 0


def test_plan_fields_say_when_vllm_took_another_dtype(model: Path):
    p = plan(model)
    assert plan_fields(p, "float32")["dtype_reason"].startswith("this CPU has no native bfloat16")
    other = plan_fields(p, "bfloat16")
    assert other["dtype"] == "bfloat16" and other["dtype_reason"].startswith("vLLM took bfloat16 instead of float32")


def test_worker_dtype_flag_is_checked_before_anything_loads(model: Path):
    from rbee.errors import RbeeError
    from rbee_worker.settings import build_parser, settings_from

    argv = ["--model", str(model), "--port", "7910", "--api-key", "k"]
    assert settings_from(build_parser().parse_args([*argv, "--dtype", "BF16"]), {}).dtype == "bfloat16"
    assert settings_from(build_parser().parse_args(argv), {}).dtype == "auto"
    with pytest.raises(RbeeError) as exc:
        settings_from(build_parser().parse_args([*argv, "--dtype", "int3"]), {})
    assert exc.value.code == "INVALID_ARGUMENT" and exc.value.details["flag"] == "--dtype"
    assert "--dtype auto" in exc.value.suggestions[0]
