"""The Engine on vLLM's asyncio engine (AsyncLLM), CPU or CUDA.

vLLM is imported here only, and only inside load(), so that `--help`,
`--version` and the unit tests never pay for importing torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rbee.errors import RbeeError
from rbee_worker.engine import (
    CANCELLED,
    Delta,
    Engine,
    EngineInfo,
    LoadProgress,
    ProgressCallback,
    SamplingOptions,
    encode_prompt,
    load_failed,
)
from rbee_worker.load_stages import StageListener

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048
# On CPU the KV cache is plain RAM reserved up front; 1 GiB holds thousands of
# tokens for a small model without starving the other processes on the node.
DEFAULT_CPU_KVCACHE_GIB = "1"
# On CPU vLLM reads this as a fraction of RAM; the KV cache size above is what counts.
CPU_MEMORY_UTILIZATION = 0.3
CUDA_MEMORY_UTILIZATION = 0.85

STAGES = ("tokenizer", "engine_config", "engine_start", "weights", "kv_cache", "ready")
_STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
# Child-process markers (load_stages.MARKERS) -> the stage they belong to.
_CHILD_STAGES = {
    "weights": "weights",
    "weights_loaded": "weights",
    "kv_cache": "kv_cache",
    "warmup_done": "kv_cache",
}
_FINISH = {"stop": "stop", "length": "length", "abort": CANCELLED}

# Keys under which Hugging Face configs give the context length.
_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def model_context_len(model_path: str) -> int | None:
    """The context length the model's config.json declares (None if unknown)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for source in (cfg, cfg.get("text_config") or {}):
        for key in _LEN_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def bounded_max_model_len(model_path: str, cap: int | None) -> int | None:
    """min(model's context, cap); None lets vLLM derive it."""
    declared = model_context_len(model_path)
    if cap is None:
        return declared
    return min(declared, cap) if declared else cap


class VllmEngine(Engine):
    def __init__(
        self,
        model_path: str,
        backend: str = "cpu",
        device: int = 0,
        max_num_seqs: int = 8,
        max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
        dtype: str = "auto",
    ) -> None:
        self.model_path = model_path
        self.backend = backend
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_model_len_cap = max_model_len
        self.dtype = dtype
        self._llm: Any = None
        self._tokenizer: Any = None
        self._sampling: Any = None  # (SamplingParams, RequestOutputKind)

    # -- loading -------------------------------------------------------------

    def _engine_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.backend == "cpu":
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
        elif self.backend == "cuda":
            # The engine runs in spawned processes that read this at start:
            # they see only the chosen GPU, as device 0.
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        return env

    async def load(self, progress: ProgressCallback) -> EngineInfo:
        loop = asyncio.get_running_loop()
        total = len(STAGES)

        def report(stage: str, message: str) -> None:
            # done = stages completed before this one; "ready" completes them all.
            done = total if stage == "ready" else _STAGE_INDEX[stage]
            progress(LoadProgress(stage=stage, done=done, total=total, message=message))

        def on_child_stage(marker: str, message: str) -> None:
            # vLLM's own words, e.g. "Loading weights took 0.21 seconds".
            stage = _CHILD_STAGES.get(marker)
            if stage is not None:
                report(stage, message)

        listener = StageListener(on_child_stage)
        try:
            report("tokenizer", f"Loading tokenizer from {self.model_path}")
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer)

            report("engine_config", "Preparing the engine configuration")
            # The engine's processes inherit these; this process is the worker
            # and serves one engine, so its own environment is the right place.
            os.environ.update(self._engine_env())
            os.environ.update(listener.start(loop))
            args = await asyncio.to_thread(self._engine_args)

            report("engine_start", f"Starting vLLM engine (backend {self.backend}, device {self.device})")
            # Building AsyncLLM blocks until the engine process has loaded the
            # weights and sized its cache; a thread keeps the gRPC server answering.
            self._llm = await asyncio.to_thread(self._start_engine, args)
            info = EngineInfo(
                max_model_len=int(self._llm.model_config.max_model_len),
                engine_version=self.engine_version(),
                max_num_seqs=self.max_num_seqs,
            )
            report("ready", f"Model ready (max_model_len {info.max_model_len})")
            return info
        except Exception as exc:  # noqa: BLE001 - every failure becomes MODEL_LOAD_FAILED
            # The narrated MODEL_LOAD_FAILED line says what failed; vLLM's own
            # processes log their errors above it. The trace is for debugging.
            log.debug("loading %s failed", self.model_path, exc_info=True)
            raise load_failed(self.model_path, exc) from exc
        finally:
            listener.close()

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=self.dtype,
            max_model_len=bounded_max_model_len(self.model_path, self.max_model_len_cap),
            max_num_seqs=self.max_num_seqs,
            enforce_eager=True,
            gpu_memory_utilization=CPU_MEMORY_UTILIZATION if self.backend == "cpu" else CUDA_MEMORY_UTILIZATION,
            disable_log_stats=True,
        )

    def _start_engine(self, args: Any) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM

        self._sampling = (SamplingParams, RequestOutputKind)
        return AsyncLLM.from_engine_args(args)

    @staticmethod
    def engine_version() -> str:
        import vllm

        return str(vllm.__version__)

    # -- serving -------------------------------------------------------------

    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        if self._tokenizer is None:
            raise RbeeError("MODEL_LOADING", "The tokenizer is not loaded yet")
        return encode_prompt(self._tokenizer, prompt, raw_prompt)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[Delta]:
        if self._llm is None or self._sampling is None:
            raise RbeeError("MODEL_LOADING", "The engine is not started yet")
        sampling_params_cls, kind = self._sampling
        params = sampling_params_cls(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            seed=options.seed,
            stop=list(options.stop) or None,
            ignore_eos=options.ignore_eos,
            output_kind=kind.DELTA,
        )
        prompt_tokens = len(prompt_token_ids)
        async for out in self._llm.generate({"prompt_token_ids": prompt_token_ids}, params, request_id):
            completion = out.outputs[0]
            reason = completion.finish_reason
            yield Delta(
                token_ids=list(completion.token_ids),
                text=completion.text,
                finished=bool(out.finished),
                finish_reason=_FINISH.get(reason, reason) if reason else None,
                prompt_tokens=prompt_tokens,
            )

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def health(self) -> None:
        if self._llm is None:
            raise RbeeError("MODEL_LOADING", "The engine is not started yet")
        try:
            await self._llm.check_health()
        except Exception as exc:  # noqa: BLE001
            raise RbeeError("INTERNAL", f"vLLM engine is not healthy: {type(exc).__name__}: {exc}") from exc

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # AsyncLLM stops its engine process before it cancels the task that
        # reads the engine's output; that task would meet the dead engine and
        # log an EngineDeadError traceback. Stop the reader first.
        reader = getattr(llm, "output_handler", None)
        if isinstance(reader, asyncio.Task) and not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await asyncio.to_thread(llm.shutdown)
