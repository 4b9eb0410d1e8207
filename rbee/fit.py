"""How much memory a worker of a model needs, estimated from the model's files
and its config.json (docs/queen.md, "Fit").

    weights   the weight files' bytes, rescaled to the dtype the worker will
              run in (rbee/dtype.py: a bfloat16 model runs in float32 on a CPU
              without native bfloat16, which doubles it)
    KV cache  slots × context length × (2 × layers × KV heads × head size ×
              the dtype's bytes), as the worker sizes its CPU KV cache
    engine    ENGINE_OVERHEAD_BYTES: what the engine costs before any weight
              or cache (two Python processes with torch and vLLM imported,
              their allocator arenas, the tokenizer), plus on a CPU the
              float32 logits of a full batch (BATCHED_TOKENS × vocabulary)
              and their copies, which a request for the prompt's logprobs
              fills

The hive computes the model's figures (``fit_facts``) where its files are and
hands them to the queen in its model listing; the queen adds them up per node
(``estimate``). Pure but for reading config.json.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rbee.dtype import BYTES, ModelFacts, choose_dtype, model_facts, weights_bytes

MiB = 1024 * 1024
GiB = 1024 * MiB
# Measured on this project's CPU machine (2 cores, avx512_bf16): a loaded
# worker of the default model (SmolLM2-135M-Instruct in bfloat16, 8 slots ×
# 2048 tokens: 257 MiB of weights, 360 MiB of KV cache) peaks at 2692 MiB
# resident across the worker, its helper, vLLM's EngineCore and its CPU
# worker process (sum of each process's VmHWM; 2494 MiB steady). The rest,
# about 2.0 GiB, is what the engine costs whatever the model: each process
# imports torch and vLLM and keeps its allocator arenas. Shared library
# pages count once per process there, as the kernel's RSS does: the figure
# errs on the side of "short".
ENGINE_OVERHEAD_BYTES = 2048 * MiB
# At full load the engine also holds float32 logits for a whole batch: up to
# BATCHED_TOKENS positions when a client asks for the prompt's logprobs, and
# the log-softmax, top-k and copies made of them. Measured here: 8 slots each
# with a 1,983-token prompt and logprobs of prompt and tokens at 20 peaked at
# 3,927 to 4,230 MiB across runs (the higher after a whole suite's other
# requests on the same worker): 3.2 to 4.0 × (2048 positions × 49,152 tokens
# × 4 bytes) above the idle peak. tests/integration/test_fit_measured.py
# drives that load; 4.5 leaves room above the highest seen.
BATCHED_TOKENS = 2048  # the worker's max_num_batched_tokens on CPU (rbee_worker/vllm_engine.py)
LOGITS_COPIES = 4.5
# The worker's defaults (rbee_worker/program.py): slots on CPU, context cap.
DEFAULT_SLOTS = {"cpu": 8, "cuda": 32, "metal": 8}
DEFAULT_CONTEXT = 2048
# When config.json gives no figures to size the KV cache: the worker's own fallback.
KV_CACHE_UNKNOWN = GiB
KV_CACHE_FLOOR = 64 * MiB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# The keys of a model listing's metadata that carry these figures.
PREFIX = "fit."


def weight_files_bytes(model_path: str | Path) -> int:
    root = Path(model_path)
    if root.is_file():
        return root.stat().st_size
    try:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    except OSError:
        return 0


def _max_context(model_path: Path) -> int:
    import json

    try:
        cfg = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(cfg, dict):
        return 0
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    value = {**cfg, **text}.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else 0


def worker_context(model_path: str | Path) -> int:
    """The context a worker gives the model when the hive names none: the
    model's own, capped at DEFAULT_CONTEXT (the worker's --max-model-len)."""
    model_context = _max_context(Path(model_path))
    return min(DEFAULT_CONTEXT, model_context) if model_context else DEFAULT_CONTEXT


def fit_facts(model_path: str | Path, backend: str = "cpu", cpu_flags: Iterable[str] = ()) -> dict[str, str]:
    """The figures of a downloaded model the estimate needs, as string
    metadata: weight bytes on disk, the dtype stored and the one a worker
    on this machine runs, layers, KV heads, head size, the model's context."""
    path = Path(model_path)
    facts = model_facts(path)
    # On a GPU the worker keeps the model's own dtype where the device allows it.
    run = choose_dtype("cpu", facts.dtype, cpu_flags=cpu_flags).dtype if backend == "cpu" else facts.dtype
    return {
        f"{PREFIX}weights_bytes": str(weight_files_bytes(path)),
        f"{PREFIX}stored_dtype": facts.dtype if facts.dtype_known else "",
        f"{PREFIX}dtype": run,
        f"{PREFIX}layers": str(facts.layers),
        f"{PREFIX}kv_heads": str(facts.kv_heads),
        f"{PREFIX}head_dim": str(facts.head_dim),
        f"{PREFIX}context": str(_max_context(path)),
        f"{PREFIX}vocab": str(facts.vocab),
    }


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    overhead: int
    dtype: str
    slots: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    def describe(self) -> str:
        return (f"{gib(self.total)} (weights {gib(self.weights)} in {self.dtype}, KV cache {gib(self.kv_cache)} for "
                f"{self.slots} slots × {self.context} tokens, engine {gib(self.overhead)})")  # fmt: skip

    def as_dict(self) -> dict[str, int | str]:
        return {"bytes": self.total, "weights_bytes": self.weights, "kv_cache_bytes": self.kv_cache,
                "overhead_bytes": self.overhead, "dtype": self.dtype, "slots": self.slots, "context": self.context}  # fmt: skip


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _int(meta: Mapping[str, str], key: str) -> int:
    try:
        return max(0, int(meta.get(PREFIX + key, "0") or 0))
    except ValueError:
        return 0


def estimate(meta: Mapping[str, str], size_bytes: int, backend: str = "cpu", slots: int = 0, context: int = 0) -> Estimate:
    """A worker's memory from a model listing's figures (``fit_facts``);
    ``size_bytes`` (the model's size on disk) stands in for the weights
    when the listing has no figures."""
    slots = slots or DEFAULT_SLOTS.get(backend, 8)
    model_context = _int(meta, "context")
    context = context or (min(DEFAULT_CONTEXT, model_context) if model_context else DEFAULT_CONTEXT)
    dtype = meta.get(PREFIX + "dtype", "") or "float32"
    dtype = dtype if dtype in BYTES else "float32"
    stored = meta.get(PREFIX + "stored_dtype", "")
    files = _int(meta, "weights_bytes") or size_bytes
    weights = weights_bytes(files, stored, dtype) if stored in BYTES else files
    facts = ModelFacts(dtype=stored or dtype, layers=_int(meta, "layers"), kv_heads=_int(meta, "kv_heads"), head_dim=_int(meta, "head_dim"))
    per_token = facts.kv_bytes_per_token(dtype)
    kv = max(KV_CACHE_FLOOR, int(math.ceil(slots * context * per_token / MiB)) * MiB) if per_token else KV_CACHE_UNKNOWN
    if backend != "cpu":
        # On a GPU, vLLM profiles its activations inside its own memory budget.
        return Estimate(weights, 0, ENGINE_OVERHEAD_BYTES, dtype, slots, context)
    logits = int(BATCHED_TOKENS * _int(meta, "vocab") * 4 * LOGITS_COPIES)
    return Estimate(weights, kv, ENGINE_OVERHEAD_BYTES + logits, dtype, slots, context)


# What a hive measured (rbee_hive/catalog/fits.py): its model listing's
# metadata carries a JSON list under this key.
MEASURED_KEY = PREFIX + "measured"
MAX_MEASURED = 16


@dataclass(frozen=True)
class Measured:
    """A worker's peak memory as a hive measured it, with the settings it ran with."""

    bytes: int
    backend: str
    dtype: str
    slots: int
    context: int
    device_bytes: int = 0
    measured_at_unix: int = 0
    # Every slot was busy at some sample: the peak covers a full batch.
    full_load: bool = False

    def matches(self, est: Estimate, backend: str) -> bool:
        # The listing's dtype is the one a CPU worker runs; a GPU worker's is the device's choice.
        same_dtype = self.dtype == est.dtype or backend != "cpu"
        return self.backend == backend and same_dtype and self.slots == est.slots and self.context == est.context

    def as_dict(self) -> dict[str, int | str]:
        return {"bytes": self.bytes, "backend": self.backend, "dtype": self.dtype, "slots": self.slots,
                "context": self.context, "device_bytes": self.device_bytes, "measured_at_unix": self.measured_at_unix,
                "full_load": self.full_load}  # fmt: skip


def measurements(meta: Mapping[str, str]) -> list[Measured]:
    """The measurements in a model listing's metadata; what is not well formed
    (a hive of another release, a broken one) is left out."""
    import json

    try:
        items = json.loads(meta.get(MEASURED_KEY, "") or "[]")
    except ValueError:
        return []
    out = []
    for item in items[:MAX_MEASURED] if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        ints = [item.get(k, 0) for k in ("peak_bytes", "slots", "context", "device_peak_bytes", "measured_at_unix")]
        texts = [item.get(k) for k in ("backend", "dtype")]
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) and all(isinstance(t, str) for t in texts):
            peak, slots, context, device, stamp = ints
            if peak > 0:
                full = item.get("full_load") is True
                out.append(Measured(peak, texts[0], texts[1], slots, context, device, stamp, full))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class Need:
    """What a worker needs on a node: the measurement where one matches the
    estimate's settings (backend, dtype, slots, context) and was taken at
    full load or passes the estimate, else the estimate. A peak of a worker
    that never had every slot busy is not what it can reach: below the
    estimate it would place a worker where a full batch does not fit."""

    estimate: Estimate
    measured: Measured | None = None

    @property
    def total(self) -> int:
        return self.measured.bytes if self.measured is not None else self.estimate.total

    @property
    def basis(self) -> str:
        return "measured" if self.measured is not None else "estimate"


def need(est: Estimate, metas: Iterable[Mapping[str, str]], backend: str = "cpu") -> Need:
    """``est`` replaced by the first matching measurement in ``metas``
    (listings in order of preference: the node's own first)."""
    for meta in metas:
        found = [m for m in measurements(meta) if m.matches(est, backend) and (m.full_load or m.bytes >= est.total)]
        if found:
            return Need(est, max(found, key=lambda m: m.bytes))
    return Need(est)


# The listing's keys the estimate reads (``fit_facts``), without the prefix.
FIGURE_KEYS = ("weights_bytes", "stored_dtype", "dtype", "layers", "kv_heads", "head_dim", "context", "vocab")


def listing_need(figures: Mapping[str, str], size_bytes: int, own: Mapping[str, str] | None, backend: str = "cpu",
                 slots: int = 0) -> Need:  # fmt: skip
    """The need on a node from model listings: the estimate from ``figures``
    (the node's own listing, or another node's when it does not hold the
    model), replaced by a matching measurement in ``own`` (the node's own
    listing, None when it does not hold the model). The same listings give
    the same answer, computed once: a placement asks this for every node."""
    values = tuple(figures.get(PREFIX + k, "") for k in FIGURE_KEYS)
    measured = own.get(MEASURED_KEY, "") if own is not None else ""
    return _listing_need(values, size_bytes, measured, backend, slots)


@lru_cache(maxsize=512)
def _listing_need(values: tuple[str, ...], size_bytes: int, measured: str, backend: str, slots: int) -> Need:
    meta = {PREFIX + k: v for k, v in zip(FIGURE_KEYS, values) if v}
    est = estimate(meta, size_bytes, backend, slots)
    return need(est, [{MEASURED_KEY: measured}] if measured else [], backend)
