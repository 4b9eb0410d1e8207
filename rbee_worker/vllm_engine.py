"""The Engine on vLLM's asyncio engine (AsyncLLM), CPU or CUDA.

vLLM is imported here only, and only inside load(), so that `--help`,
`--version` and the unit tests never pay for importing torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from rbee.errors import RbeeError
from rbee.fit import BATCHED_TOKENS
from rbee_worker.engine import (
    Delta,
    Engine,
    EngineInfo,
    EngineLoad,
    ProgressCallback,
    SamplingOptions,
    encode_chat,
    encode_prompt,
    load_failed,
)
from rbee_worker.engine_death import Remedies
from rbee_worker.engine_watch import EngineWatch, watch_processes
from rbee_worker.engine_plan import EnginePlan, machine_plan, plan_fields
from rbee_worker.loading_stages import CHILD_STAGES, ForwardStages, StageListener
from rbee_worker.model_files import bounded_max_model_len, tokenizer_sha256
from rbee_worker.vllm_sampling import FINISH_REASONS, position_logprobs, sampling_kwargs

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048
# On CPU the KV cache is plain RAM reserved up front, sized from slots ×
# context length (engine_plan.py). On CPU vLLM reads this as a fraction of RAM; the KV cache size above is what counts.
CPU_MEMORY_UTILIZATION = 0.3
CUDA_MEMORY_UTILIZATION = 0.85
# When a request fails because the engine died, how long to wait for the
# watch to confirm that its process is gone and to say why.
DEATH_VERDICT_WAIT_S = 5.0


def _stats_logger(sink: Any) -> Any:
    """A vLLM stat logger class that hands each step's scheduler figures to `sink`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestSchedulerStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                sink(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return LatestSchedulerStats


class VllmEngine(Engine):
    def __init__(
        self,
        model_path: str,
        backend: str = "cpu",
        device: int = 0,
        max_num_seqs: int = 8,
        max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
        dtype: str = "auto",
        sleep_mode: bool = False,
    ) -> None:
        self.model_path = model_path
        # vLLM's sleep mode (rbee_worker/sleep.py): CUDA only, asked at engine start.
        self.sleep_mode = sleep_mode and backend == "cuda"
        self.backend = backend
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_model_len_cap = max_model_len
        self.dtype = dtype
        self.plan: EnginePlan | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._sampling: Any = None  # (SamplingParams, RequestOutputKind, StructuredOutputsParams)
        self._defaults: dict[str, Any] = {}
        self._scheduler_stats: Any = None
        self._client_errors: tuple[type[BaseException], ...] = (ValueError,)
        self._watch: EngineWatch | None = None
        self._death_listeners: list[Callable[[RbeeError], None]] = []

    # -- loading -------------------------------------------------------------

    def _engine_env(self) -> dict[str, str]:
        env: dict[str, str] = dict(self.plan.env) if self.plan is not None else {}
        if self.backend == "cuda":
            # The engine runs in spawned processes that read this at start:
            # they see only the chosen GPU, as device 0.
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        return env

    async def load(self, progress: ProgressCallback) -> EngineInfo:
        loop = asyncio.get_running_loop()
        report = ForwardStages(progress)

        def on_child_stage(marker: str, message: str) -> None:
            # vLLM's own words, e.g. "Loading weights took 0.21 seconds".
            stage = CHILD_STAGES.get(marker)
            if stage is not None:
                report(stage, message)

        listener = StageListener(on_child_stage)
        try:
            report("tokenizer", f"Loading tokenizer from {self.model_path}")
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer)

            report("engine_config", "Preparing the engine configuration")
            self.plan = await asyncio.to_thread(self._plan)
            for line in self.plan.stage_lines():
                report("engine_config", line)
            # The engine's processes inherit these; this process is the worker
            # and serves one engine, so its own environment is the right place.
            os.environ.update(self._engine_env())
            os.environ.update(listener.start(loop))
            args = await asyncio.to_thread(self._engine_args)

            report("engine_start", f"Starting vLLM engine (backend {self.backend}, device {self.device})")
            # Building AsyncLLM blocks until the engine process has loaded the
            # weights and sized its cache; a thread keeps the gRPC server answering.
            self._llm = await asyncio.to_thread(self._start_engine, args)
            info = await asyncio.to_thread(self._info)
            self._start_watch(info)
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

    def _max_model_len(self) -> int:
        return bounded_max_model_len(self.model_path, self.max_model_len_cap) or DEFAULT_MAX_MODEL_LEN

    def _plan(self) -> EnginePlan:
        return machine_plan(
            self.model_path, self.backend, self.device,
            slots=self.max_num_seqs, max_model_len=self._max_model_len(), override=self.dtype,
        )  # fmt: skip

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        plan = self.plan
        extra: dict[str, Any] = {}
        if plan is not None and plan.kv_cache_bytes is not None:
            extra["kv_cache_memory_bytes"] = plan.kv_cache_bytes
        if self.backend == "cpu":
            # Fixed rather than vLLM's default: the fit estimate counts the
            # logits of this many positions (rbee/fit.py).
            extra["max_num_batched_tokens"] = BATCHED_TOKENS
        return AsyncEngineArgs(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=plan.dtype.dtype if plan is not None else self.dtype,
            **extra,
            max_model_len=bounded_max_model_len(self.model_path, self.max_model_len_cap),
            max_num_seqs=self.max_num_seqs,
            enforce_eager=True,
            gpu_memory_utilization=CPU_MEMORY_UTILIZATION if self.backend == "cpu" else CUDA_MEMORY_UTILIZATION,
            disable_log_stats=True,
            **({"enable_sleep_mode": True} if self.sleep_mode else {}),
        )

    def _start_engine(self, args: Any) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.exceptions import VLLMClientError

        self._sampling = (SamplingParams, RequestOutputKind, StructuredOutputsParams)
        # Raised for the request's own faults (vLLM also raises ValueError for some).
        self._client_errors = (ValueError, VLLMClientError)
        # The stat logger is how the engine's queue and KV cache use reach GetLoad.
        return AsyncLLM.from_engine_args(args, stat_loggers=[_stats_logger(self._on_scheduler_stats)])

    def _start_watch(self, info: EngineInfo) -> None:
        """Follow the engine core's process, to say why if it dies (engine_watch.py)."""
        try:
            candidates = list(self._llm.engine_core.resources.engine_manager.processes)
        except AttributeError:  # the engine runs in this process: nothing to watch
            candidates = []
        procs = watch_processes(candidates)
        if not procs:
            log.info("no engine process to watch")
            return
        pid, name, exitcode = procs[0]
        remedies = Remedies(
            backend=self.backend,
            slots=self.max_num_seqs,
            max_model_len=info.max_model_len,
            kv_cache_gib=self._kv_cache_gib() if self.backend == "cpu" else None,
        )
        self._watch = EngineWatch(pid, name or "EngineCore", exitcode, remedies)
        self._watch.start()
        self._watch.on_death(self._engine_died)

    def _kv_cache_gib(self) -> str | None:
        if self.plan is not None and self.plan.kv_cache_bytes is not None:
            return f"{self.plan.kv_cache_bytes / 2**30:.2f}"
        return os.environ.get("VLLM_CPU_KVCACHE_SPACE")

    def _engine_died(self, err: RbeeError) -> None:
        for listener in list(self._death_listeners):
            listener(err)

    def on_death(self, listener: Callable[[RbeeError], None]) -> None:
        self._death_listeners.append(listener)

    async def _failure(self, exc: BaseException, dead: bool) -> BaseException:
        """Why a call to the engine failed: the engine's death, named, when
        its process is gone; otherwise the exception itself."""
        watch = self._watch
        if watch is None:
            return exc
        dead = dead or type(exc).__name__ == "EngineDeadError" or bool(getattr(self._llm, "errored", False))
        verdict = await watch.wait_verdict(DEATH_VERDICT_WAIT_S) if dead else watch.verdict
        return verdict or exc

    def _on_scheduler_stats(self, stats: Any) -> None:
        self._scheduler_stats = stats

    def _info(self) -> EngineInfo:
        mc = self._llm.model_config
        tok = self._tokenizer
        self._defaults = dict(mc.get_diff_sampling_param())
        eos = {i for i in (tok.eos_token_id,) if i is not None}
        gen_eos = (mc.try_get_generation_config() or {}).get("eos_token_id")
        if gen_eos is not None:
            eos.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        return EngineInfo(
            max_model_len=int(mc.max_model_len),
            engine_version=self.engine_version(),
            max_num_seqs=self.max_num_seqs,
            vocab_size=int(mc.get_vocab_size()),
            eos_token_ids=tuple(sorted(eos)),
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            has_chat_template=bool(getattr(tok, "chat_template", None)),
            defaults=dict(self._defaults),
            max_logprobs=int(mc.max_logprobs),
            tokenizer_sha256=tokenizer_sha256(self.model_path),
            **plan_fields(self.plan, str(mc.dtype).removeprefix("torch.")),
        )

    @staticmethod
    def engine_version() -> str:
        import vllm

        return str(vllm.__version__)

    # -- serving -------------------------------------------------------------

    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        if self._tokenizer is None:
            raise RbeeError("MODEL_LOADING", "The tokenizer is not loaded yet")
        return encode_prompt(self._tokenizer, prompt, raw_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if self._tokenizer is None:
            raise RbeeError("MODEL_LOADING", "The tokenizer is not loaded yet")
        return encode_chat(self._tokenizer, messages)

    def load_stats(self) -> EngineLoad | None:
        st = self._scheduler_stats
        if st is None:
            return None
        return EngineLoad(int(st.num_running_reqs), int(st.num_waiting_reqs), float(st.kv_cache_usage))

    def sampling_params(self, options: SamplingOptions) -> Any:
        params_cls, kind, structured_cls = self._sampling
        kw = sampling_kwargs(options, self._defaults)
        if "structured_outputs" in kw:
            kw["structured_outputs"] = structured_cls(**kw["structured_outputs"])
        try:
            return params_cls(output_kind=kind.DELTA, **kw)
        except self._client_errors as exc:
            field = options.constraint.kind if options.constraint else getattr(exc, "parameter", None) or "sampling"
            raise RbeeError("INVALID_ARGUMENT", f"Invalid {field}: {exc}", {"field": field}) from None

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[Delta]:
        if self._llm is None or self._sampling is None:
            raise RbeeError("MODEL_LOADING", "The engine is not started yet")
        params = self.sampling_params(options)
        prompt_tokens = len(prompt_token_ids)
        first = True
        if self._watch is not None and self._watch.verdict is not None:
            raise self._watch.verdict
        stream = self._llm.generate({"prompt_token_ids": prompt_token_ids}, params, request_id)
        while True:
            try:
                out = await anext(stream)
            except StopAsyncIteration:
                return
            except self._client_errors as exc:
                # Refused while the engine prepared the request (e.g. a grammar
                # or schema its backend cannot compile): the request's fault.
                if not first:
                    raise
                field = options.constraint.kind if options.constraint else "sampling"
                raise RbeeError("INVALID_ARGUMENT", f"Invalid {field}: {exc}", {"field": field}) from None
            except Exception as exc:  # noqa: BLE001 - the engine's death is named; the rest goes on up
                failure = await self._failure(exc, dead=False)
                if failure is exc:
                    raise
                raise failure from None
            queue_s = None
            metrics = getattr(out, "metrics", None)
            if first and metrics is not None and getattr(metrics, "scheduled_ts", 0) and metrics.queued_ts:
                queue_s = max(0.0, metrics.scheduled_ts - metrics.queued_ts)
            prompt_lp = None
            if first and options.prompt_logprobs is not None and out.prompt_logprobs is not None:
                prompt_lp = [
                    position_logprobs(entries, prompt_token_ids[i], options.prompt_logprobs)
                    for i, entries in enumerate(out.prompt_logprobs)
                ]
            for completion in out.outputs:
                reason = completion.finish_reason
                ids = list(completion.token_ids)
                logprobs = None
                if options.logprobs is not None and completion.logprobs is not None:
                    logprobs = [
                        position_logprobs(completion.logprobs[i], t, options.logprobs) for i, t in enumerate(ids)
                    ]
                yield Delta(
                    token_ids=ids,
                    text=completion.text,
                    finished=reason is not None,
                    finish_reason=FINISH_REASONS.get(reason, reason) if reason else None,
                    stop_reason=completion.stop_reason,
                    prompt_tokens=prompt_tokens,
                    completion=completion.index,
                    cached_tokens=int(out.num_cached_tokens or 0),
                    logprobs=logprobs,
                    prompt_logprobs=prompt_lp,
                    queue_time_s=queue_s,
                )
                prompt_lp = None
                queue_s = None
            first = False

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def sleep_unsupported(self) -> str:
        if self.backend != "cuda":
            return f"vLLM has sleep mode on CUDA only, and this engine runs on {self.backend}"
        if not self.sleep_mode:
            return "the engine was started without sleep mode (RBEE_WORKER_SLEEP_MODE=1)"
        return ""

    async def sleep(self, level: int) -> None:
        await self._llm.sleep(level)

    async def wake_up(self) -> None:
        await self._llm.wake_up()

    async def health(self) -> None:
        if self._watch is not None and self._watch.verdict is not None:
            raise self._watch.verdict
        if self._llm is None:
            raise RbeeError("MODEL_LOADING", "The engine is not started yet")
        try:
            await self._llm.check_health()
        except Exception as exc:  # noqa: BLE001
            failure = await self._failure(exc, dead=True)
            if isinstance(failure, RbeeError):
                raise failure from None
            raise RbeeError("INTERNAL", f"vLLM engine is not healthy: {type(exc).__name__}: {exc}") from exc

    async def shutdown(self) -> None:
        # Stopping the engine on purpose is no death to report.
        if self._watch is not None:
            await self._watch.stop()
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
