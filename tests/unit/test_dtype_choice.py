"""The dtype a worker runs in, from pinned /proc/cpuinfo contents and device figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rbee.cpus import cpu_flags
from rbee.dtype import MB, choose_dtype, model_facts, normalize, weights_bytes
from rbee.errors import RbeeError

# First processor of /proc/cpuinfo on three machines (flags abridged to what matters).
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2
"""
EPYC_ZEN4 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
"""


def test_cpu_without_native_bf16_gets_float32():
    choice = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(EPYC_AVX2))
    assert choice.dtype == "float32"
    assert choice.line().startswith("float32: this CPU has no native bfloat16")


@pytest.mark.parametrize(("cpuinfo", "flag"), [(EPYC_ZEN4, "avx512_bf16"), (XEON_AMX, "amx_bf16")])
def test_cpu_with_native_bf16_gets_bfloat16(cpuinfo, flag):
    choice = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(cpuinfo))
    assert choice.dtype == "bfloat16"
    assert flag in choice.reason


def test_arm_features_line_is_read():
    assert "asimd" in cpu_flags(ARM)
    assert choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(ARM)).dtype == "float32"


def test_override_wins_and_names_its_source():
    choice = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(EPYC_AVX2), override="bf16")
    assert (choice.dtype, choice.reason) == ("bfloat16", "set by --dtype")
    hive = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(XEON_AMX), override="fp32", override_source="the hive's worker_dtype")
    assert hive.line() == "float32: set by the hive's worker_dtype"


def test_unknown_dtype_is_invalid_argument():
    with pytest.raises(RbeeError) as exc:
        normalize("int3")
    assert exc.value.code == "INVALID_ARGUMENT"
    assert "float32" in exc.value.suggestions[0]


def test_float32_that_would_not_fit_falls_back_to_bfloat16():
    need = {"float32": 2000 * MB, "bfloat16": 1000 * MB, "float16": 1000 * MB}
    choice = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(EPYC_AVX2), need_bytes=need, available_bytes=1500 * MB)
    assert choice.dtype == "bfloat16"
    assert "float32 would need 2000 MB and 1500 MB are available" in choice.reason
    # Room for float32: float32.
    roomy = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(EPYC_AVX2), need_bytes=need, available_bytes=4000 * MB)
    assert roomy.dtype == "float32"
    # An explicit choice is not second-guessed.
    forced = choose_dtype("cpu", "bfloat16", cpu_flags=cpu_flags(EPYC_AVX2), override="float32", need_bytes=need, available_bytes=1500 * MB)
    assert forced.dtype == "float32"


@pytest.mark.parametrize(
    ("model", "capability", "expected"),
    [
        ("bfloat16", (8, 0), "bfloat16"),  # A100
        ("bfloat16", (8, 9), "bfloat16"),  # L4
        ("bfloat16", (7, 5), "float16"),  # T4: no bf16
        ("float16", (7, 0), "float16"),
        ("float32", (7, 5), "float32"),
    ],
)
def test_cuda_keeps_the_models_dtype_where_the_device_supports_it(model, capability, expected):
    choice = choose_dtype("cuda", model, capability=capability)
    assert choice.dtype == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def test_cuda_without_a_device_fails_fast():
    with pytest.raises(RbeeError) as exc:
        choose_dtype("cuda", "bfloat16", capability=None)
    assert exc.value.code == "CUDA_NOT_AVAILABLE"
    assert "--backend cpu" in exc.value.suggestions[0]


def test_model_facts_from_config(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({
        "dtype": "bfloat16", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "hidden_size": 576,
    }))  # fmt: skip
    facts = model_facts(tmp_path)
    assert (facts.dtype, facts.dtype_known, facts.layers, facts.kv_heads, facts.head_dim) == ("bfloat16", True, 30, 3, 64)
    assert facts.kv_bytes_per_token("float32") == 2 * 30 * 3 * 64 * 4
    assert weights_bytes(270 * MB, "bfloat16", "float32") == 540 * MB
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"torch_dtype": "float16", "num_hidden_layers": 2}}))
    assert model_facts(tmp_path).dtype == "float16"
    assert model_facts(tmp_path / "missing").dtype_known is False
