"""Which dtype a worker runs its model in, and what that costs in memory.

The rule (docs/hive.md, "dtype and threads"):

- On CPU: bfloat16 where the CPU computes it natively (``avx512_bf16`` or
  ``amx_bf16`` in ``/proc/cpuinfo``), float32 otherwise: a CPU without them
  emulates bfloat16, several times slower than float32. float32 doubles the
  weights' memory; where it would not fit but bfloat16 would, bfloat16.
- On CUDA: the model's own dtype where the device supports it (bfloat16 needs
  compute capability 8.0 or later), float16 otherwise.
- An explicit dtype (the worker's ``--dtype``, the hive's ``worker_dtype``)
  wins over all of it.

The worker decides with the figures of its own process; the hive uses the
same function for its resource check before the spawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.cpus import native_bf16_flag
from rbee.errors import RbeeError

DTYPES = ("float32", "bfloat16", "float16")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip
AUTO = "auto"
MB = 1024 * 1024


def normalize(dtype: str) -> str:
    """A dtype name or alias → its canonical name ("auto" stays); INVALID_ARGUMENT otherwise."""
    name = (dtype or AUTO).strip().lower().removeprefix("torch.")
    if name == AUTO:
        return AUTO
    if name not in ALIASES:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16",
            {"field": "dtype", "accepted": "auto, float32, bfloat16, float16"},
            ["Pass --dtype auto (chosen from the hardware), float32, bfloat16 or float16"],
        )
    return ALIASES[name]


@dataclass(frozen=True)
class ModelFacts:
    """What config.json says about the model's size in memory."""

    dtype: str = "float32"
    # Whether config.json names the dtype (else float32 is only Hugging Face's default).
    dtype_known: bool = False
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab: int = 0

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Keys and values of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES[dtype]


def model_facts(model_path: str | Path) -> ModelFacts:
    """From the model folder's config.json (a text model's, or its text_config);
    unknown figures are 0 and the dtype float32 (Hugging Face's default)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return ModelFacts()
    if not isinstance(cfg, dict):
        return ModelFacts()
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    merged: dict[str, Any] = {**cfg, **text}

    def num(*keys: str) -> int:
        for key in keys:
            value = merged.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return 0

    raw = merged.get("torch_dtype") or merged.get("dtype")
    try:
        dtype = normalize(str(raw)) if raw else AUTO
    except RbeeError:
        dtype = AUTO
    heads = num("num_attention_heads", "n_head")
    hidden = num("hidden_size", "n_embd")
    head_dim = num("head_dim") or (hidden // heads if heads else 0)
    return ModelFacts(
        dtype=dtype if dtype != AUTO else "float32",
        dtype_known=dtype != AUTO,
        layers=num("num_hidden_layers", "n_layer", "num_layers"),
        kv_heads=num("num_key_value_heads", "num_kv_heads") or heads,
        head_dim=head_dim,
        vocab=num("vocab_size", "n_vocab", "padded_vocab_size"),
    )


def weights_bytes(file_bytes: int, stored: str, dtype: str) -> int:
    """The weights' memory in ``dtype`` from their size on disk in ``stored``."""
    return int(math.ceil(file_bytes * BYTES[dtype] / BYTES.get(stored, 4)))


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str

    def line(self) -> str:
        """e.g. "float32: this CPU has no native bfloat16"."""
        return f"{self.dtype}: {self.reason}"


def choose_dtype(
    backend: str,
    model_dtype: str,
    *,
    cpu_flags: Iterable[str] = (),
    capability: tuple[int, int] | None = None,
    override: str = AUTO,
    override_source: str = "--dtype",
    need_bytes: Mapping[str, int] | None = None,
    available_bytes: int | None = None,
) -> DtypeChoice:
    """The dtype to run in and why.

    ``capability`` is the CUDA device's (major, minor); ``need_bytes`` the
    memory a worker needs in each dtype and ``available_bytes`` what the node
    has (both optional: without them fit is not considered).
    """
    chosen = normalize(override)
    if chosen != AUTO:
        return DtypeChoice(chosen, f"set by {override_source}")
    model_dtype = normalize(model_dtype)
    model_dtype = "float32" if model_dtype == AUTO else model_dtype
    if backend == "cuda":
        if capability is None:
            raise RbeeError(
                "CUDA_NOT_AVAILABLE",
                "No CUDA device to choose a dtype for: its compute capability is unknown",
                {"backend": backend},
                ["Use --backend cpu on this machine", "Or pass --dtype float16 / bfloat16 explicitly"],
            )
        cc = f"compute capability {capability[0]}.{capability[1]}"
        if model_dtype == "bfloat16" and capability < (8, 0):
            return DtypeChoice("float16", f"the model is bfloat16 but this GPU ({cc}) has no bfloat16; bfloat16 needs 8.0+")
        return DtypeChoice(model_dtype, f"the model's own dtype, which this GPU ({cc}) supports")
    flag = native_bf16_flag(cpu_flags)
    if flag is not None:
        choice = DtypeChoice("bfloat16", f"this CPU has native bfloat16 ({flag})")
    else:
        choice = DtypeChoice("float32", "this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)")
    if choice.dtype == "float32" and need_bytes and available_bytes is not None:
        need32, need16 = need_bytes.get("float32", 0), need_bytes.get("bfloat16", 0)
        if need32 > available_bytes >= need16:
            return DtypeChoice(
                "bfloat16",
                f"float32 would need {need32 // MB} MB and {available_bytes // MB} MB are available "
                "(this CPU has no native bfloat16, so it runs slower than float32 would)",
            )
    return choice
