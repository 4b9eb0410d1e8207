"""The engine's settings chosen from the hardware the worker runs on.

dtype (rbee/dtype.py: native bfloat16 or not, the GPU's compute capability,
fit in memory), the OpenMP threads and the cores they are bound to (the
process's affinity and cgroup quota, rbee/cpus.py) and the CPU KV cache sized
from slots × context length. Each choice keeps its reason, for the loading
stages, GetModelInfo and the hive's listing. Pure: the machine's figures come
in as arguments (``plan_engine``) or from ``machine_plan``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rbee.cpus import CpuBudget, cpu_budget, format_cpu_list, parse_cpu_list, read_cpu_flags
from rbee.dtype import AUTO, DTYPES, MB, ModelFacts, DtypeChoice, choose_dtype, model_facts, weights_bytes

# Loading takes more than the weights: runtime buffers, activations.
MEMORY_FACTOR = 1.2
GiB = 1024 * MB
# The CPU KV cache never goes below this, whatever the model's figures say.
KV_CACHE_FLOOR = 64 * MB
# When config.json does not give the figures to size it.
KV_CACHE_UNKNOWN = GiB
ENV_KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"
ENV_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_on_disk(model_path: str | Path) -> int:
    """Bytes of the model's weight files (0 when there are none)."""
    root = Path(model_path)
    if root.is_file():
        return root.stat().st_size
    try:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    except OSError:
        return 0


def kv_cache_bytes(facts: ModelFacts, slots: int, max_model_len: int, dtype: str) -> int:
    """Every slot at full context, rounded up to a MiB, at least KV_CACHE_FLOOR."""
    per_token = facts.kv_bytes_per_token(dtype)
    if per_token <= 0:
        return KV_CACHE_UNKNOWN
    need = slots * max_model_len * per_token
    return max(KV_CACHE_FLOOR, int(math.ceil(need / MB)) * MB)


def memory_need(file_bytes: int, facts: ModelFacts, dtype: str, kv_bytes: int = 0) -> int:
    return int(math.ceil(weights_bytes(file_bytes, facts.dtype, dtype) * MEMORY_FACTOR)) + kv_bytes


@dataclass(frozen=True)
class EnginePlan:
    backend: str
    dtype: DtypeChoice
    # CPU only: the cores the engine's OpenMP threads run on, and why.
    budget: CpuBudget | None = None
    threads_note: str = ""
    # CPU only: the KV cache in bytes, and where the figure comes from.
    kv_cache_bytes: int | None = None
    kv_cache_note: str = ""
    # What the engine's processes need in their environment.
    env: Mapping[str, str] = field(default_factory=dict)
    # The cores the OpenMP threads are bound to; None: the worker's budget.
    # () when the environment leaves the binding to vLLM ("auto", "nobind").
    bound: tuple[int, ...] | None = None

    @property
    def threads(self) -> int:
        return len(self.cores)

    @property
    def cores(self) -> tuple[int, ...]:
        if self.bound is not None:
            return self.bound
        return self.budget.omp_cores if self.budget is not None else ()

    @property
    def cpu_set(self) -> str:
        return format_cpu_list(self.cores) if self.cores else ""

    def stage_lines(self) -> list[str]:
        lines = [f"dtype {self.dtype.line()}"]
        if self.threads_note:
            lines.append(f"threads: {self.threads_note}")
        if self.kv_cache_note:
            lines.append(f"KV cache: {self.kv_cache_note}")
        return lines


def plan_engine(
    model_path: str | Path,
    backend: str,
    *,
    slots: int,
    max_model_len: int,
    override: str = AUTO,
    cpu_flags: frozenset[str] = frozenset(),
    capability: tuple[int, int] | None = None,
    available_bytes: int | None = None,
    budget: CpuBudget | None = None,
    environ: Mapping[str, str] | None = None,
) -> EnginePlan:
    environ = os.environ if environ is None else environ
    facts = model_facts(model_path)
    file_bytes = weights_on_disk(model_path)
    kv = {d: kv_cache_bytes(facts, slots, max_model_len, d) for d in DTYPES}
    need = {d: memory_need(file_bytes, facts, d, kv[d] if backend == "cpu" else 0) for d in DTYPES}
    choice = choose_dtype(
        backend, facts.dtype, cpu_flags=cpu_flags, capability=capability, override=override,
        need_bytes=need if file_bytes else None, available_bytes=available_bytes,
    )  # fmt: skip
    if backend != "cpu":
        return EnginePlan(backend, choice)
    env: dict[str, str] = {}
    budget = budget or cpu_budget()
    bind = environ.get(ENV_THREADS_BIND, "")
    bound = None
    if bind:
        threads_note = f"{ENV_THREADS_BIND}={bind} (set in the environment)"
        try:
            bound = tuple(parse_cpu_list(bind))
        except ValueError:  # "auto", "nobind" or per-rank lists: vLLM's own binding
            bound = ()
    else:
        env[ENV_THREADS_BIND] = format_cpu_list(budget.omp_cores)
        threads_note = budget.describe()
    space = environ.get(ENV_KV_SPACE, "")
    if space:
        kv_bytes = None
        kv_note = f"{ENV_KV_SPACE}={space} GiB (set in the environment)"
    else:
        kv_bytes = kv[choice.dtype]
        per = facts.kv_bytes_per_token(choice.dtype)
        how = f"{slots} slots × {max_model_len} tokens × {per} bytes" if per else "the model's config gives no figures"
        kv_note = f"{kv_bytes / MB:.0f} MiB ({how})"
    return EnginePlan(backend, choice, budget, threads_note, kv_bytes, kv_note, env, bound)


def machine_plan(
    model_path: str, backend: str, device: int, *, slots: int, max_model_len: int, override: str = AUTO
) -> EnginePlan:
    """The plan from this machine's own figures."""
    capability = None
    available = None
    if backend == "cuda" and normalize_auto(override):
        from rbee_worker.devices import SystemDevices

        capability = SystemDevices().capability(device)
    if backend == "cpu":
        import psutil

        available = int(psutil.virtual_memory().available)
    return plan_engine(
        model_path, backend, slots=slots, max_model_len=max_model_len, override=override,
        cpu_flags=read_cpu_flags(), capability=capability, available_bytes=available,
    )  # fmt: skip


def normalize_auto(override: str) -> bool:
    return (override or AUTO).strip().lower() == AUTO


def plan_fields(plan: EnginePlan | None, engine_dtype: str) -> dict[str, object]:
    """EngineInfo's dtype and CPU figures: the plan's, with the dtype vLLM actually took."""
    if plan is None:
        return {"dtype": engine_dtype}
    reason = plan.dtype.reason
    if engine_dtype and engine_dtype != plan.dtype.dtype:
        reason = f"vLLM took {engine_dtype} instead of {plan.dtype.dtype} ({reason})"
    return {
        "dtype": engine_dtype or plan.dtype.dtype,
        "dtype_reason": reason,
        "cpu_threads": plan.threads,
        "cpu_set": plan.cpu_set,
        "kv_cache_bytes": plan.kv_cache_bytes or 0,
    }
