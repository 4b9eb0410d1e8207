"""The fit estimate (rbee/fit.py) from a real config.json: the default model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rbee.config import default_model_path
from rbee.fit import BATCHED_TOKENS, ENGINE_OVERHEAD_BYTES, LOGITS_COPIES, KV_CACHE_UNKNOWN, MiB, estimate, fit_facts

NO_BF16 = frozenset({"avx2"})
BF16 = frozenset({"avx512_bf16"})


@pytest.fixture
def smol() -> Path:
    path = default_model_path()
    if not (path / "config.json").is_file():
        pytest.fail(f"the default model is missing at {path}: run `make model`")
    return path


def test_the_default_model_in_float32_on_a_cpu_without_bfloat16(smol: Path) -> None:
    meta = fit_facts(smol, "cpu", NO_BF16)
    assert meta["fit.stored_dtype"] == "bfloat16" and meta["fit.dtype"] == "float32"
    assert (meta["fit.layers"], meta["fit.kv_heads"], meta["fit.head_dim"]) == ("30", "3", "64")
    files = int(meta["fit.weights_bytes"])
    assert files == (smol / "model.safetensors").stat().st_size
    est = estimate(meta, 0)
    assert est.weights == files * 2  # bfloat16 on disk, float32 in memory
    # 8 slots × 2048 tokens × (2 × 30 layers × 3 KV heads × 64 × 4 bytes)
    assert est.kv_cache == 8 * 2048 * 2 * 30 * 3 * 64 * 4 == 720 * MiB
    assert meta["fit.vocab"] == "49152"
    # The engine, and the float32 logits of a full batch with their copies.
    logits = int(BATCHED_TOKENS * 49152 * 4 * LOGITS_COPIES)
    assert est.overhead == ENGINE_OVERHEAD_BYTES + logits
    assert est.total == est.weights + est.kv_cache + est.overhead
    assert "KV cache 0.7 GiB for 8 slots × 2048 tokens" in est.describe()


def test_the_default_model_in_bfloat16_where_the_cpu_has_it(smol: Path) -> None:
    est = estimate(fit_facts(smol, "cpu", BF16), 0, slots=2, context=1024)
    assert est.dtype == "bfloat16"
    assert est.weights == (smol / "model.safetensors").stat().st_size
    assert est.kv_cache == 64 * MiB  # 2 × 1024 × 23040 bytes is below the floor


def test_the_context_is_capped_by_the_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256,
                                                      "max_position_embeddings": 512, "torch_dtype": "float32"}))  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    est = estimate(fit_facts(tmp_path, "cpu", NO_BF16), 0)
    assert (est.context, est.weights, est.kv_cache) == (512, 1000, 64 * MiB)


def test_without_figures_the_size_on_disk_and_the_workers_fallback(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    meta = fit_facts(tmp_path, "cpu", NO_BF16)
    est = estimate(meta, size_bytes=3_000_000)
    assert est.weights == 3_000_000 and est.kv_cache == KV_CACHE_UNKNOWN
    assert estimate({}, 5).weights == 5


def test_garbage_figures_are_ignored() -> None:
    est = estimate({"fit.layers": "x", "fit.dtype": "int3", "fit.weights_bytes": "-5"}, 10)
    assert est.dtype == "float32" and est.weights == 10
