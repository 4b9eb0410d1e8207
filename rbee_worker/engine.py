"""The seam between the worker's servicer and an inference engine.

The servicer only speaks to this interface, so it is tested with a fake engine
and vLLM (or another backend) plugs in behind it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rbee.errors import RbeeError

# Finish reasons of one completion (GenerateFinal.reason on the wire).
STOP = "stop"
LENGTH = "length"
ABORT = "abort"


@dataclass(frozen=True)
class EngineInfo:
    max_model_len: int
    engine_version: str
    # Sequences the engine schedules together (its own batch limit).
    max_num_seqs: int = 0
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    has_chat_template: bool = False
    # What an unset sampling field becomes (SamplingOptions field -> value):
    # the model's generation config over the engine's own defaults.
    defaults: Mapping[str, float] = field(default_factory=dict)
    max_logprobs: int = 20
    tokenizer_sha256: str = ""
    # What the engine runs in and why (engine_plan.py): "float32", "this CPU has no native bfloat16".
    dtype: str = ""
    dtype_reason: str = ""
    # CPU: the engine's OpenMP threads, the cores they are bound to ("0-1") and its KV cache.
    cpu_threads: int = 0
    cpu_set: str = ""
    kv_cache_bytes: int = 0


@dataclass(frozen=True)
class EngineLoad:
    """The engine's own view of its queue; None from engines that do not say."""

    running: int
    waiting: int
    kv_cache_usage: float


@dataclass(frozen=True)
class LoadProgress:
    """One loading stage: `done` of `total` stages, with a short message."""

    stage: str
    done: int
    total: int
    message: str = ""
    unit: str = "stages"


ProgressCallback = Callable[[LoadProgress], None]

# Output constraints (GenerateRequest.constraint).
CONSTRAINTS = ("json_schema", "regex", "grammar", "choice")


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of CONSTRAINTS
    # The schema (JSON text), regex or grammar; the choices for "choice".
    value: str | tuple[str, ...]


@dataclass(frozen=True)
class SamplingOptions:
    """One request's sampling, engine-neutral. None means "the default"
    (EngineInfo.defaults), so an unset wire field never becomes a zero."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int = 1
    min_tokens: int = 0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    constraint: Constraint | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    token: str = ""


@dataclass(frozen=True)
class PositionLogprobs:
    chosen: TokenLogprob | None
    # Highest logprob first.
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class Delta:
    """What one engine step produced for one completion: only the new tokens."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # This completion (0..n-1) has ended.
    finished: bool = False
    # STOP, LENGTH or ABORT when finished.
    finish_reason: str | None = None
    # With STOP: the stop string (str) or stop token id (int) that matched;
    # None for end-of-sequence.
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion: int = 0
    cached_tokens: int = 0
    # One entry per token id when the request asked for logprobs.
    logprobs: list[PositionLogprobs] | None = None
    # Once per request (the first delta) when asked: one entry per prompt token.
    prompt_logprobs: list[PositionLogprobs] | None = None
    # Seconds the request waited in the engine's queue, once known.
    queue_time_s: float | None = None


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the worker uses."""

    chat_template: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def encode_prompt(tokenizer: Tokenizer, prompt: str, raw_prompt: bool) -> list[int]:
    """Token ids for a prompt: through the chat template for chat models
    (instruct models give degenerate output on raw text), as-is otherwise."""
    if not raw_prompt and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
        )
        # transformers 5 returns a BatchEncoding for tokenize=True; older ones a list.
        if hasattr(ids, "keys") and "input_ids" in ids:
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(prompt)]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation through the model's chat template, with
    the generation prompt (the model answers next)."""
    ids = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class Engine(abc.ABC):
    """An inference engine serving one loaded model."""

    @abc.abstractmethod
    async def load(self, progress: ProgressCallback) -> EngineInfo:
        """Load the model, reporting stages; raise RbeeError(MODEL_LOAD_FAILED) on failure."""

    @abc.abstractmethod
    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        """Prompt token ids (chat-templated unless raw_prompt). Only after load()."""

    @abc.abstractmethod
    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation through the chat template. Only after load()."""

    def load_stats(self) -> EngineLoad | None:
        """The engine's running/waiting requests and KV cache use, if it says."""
        return None

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        """Deltas for one request, each for one completion; every completion's
        last delta has finished=True, and the iterator ends after the last one."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request; unknown or finished ids are ignored."""

    @abc.abstractmethod
    async def health(self) -> None:
        """Raise RbeeError when the engine can no longer serve."""

    def on_death(self, listener: Callable[[RbeeError], None]) -> None:
        """Call ``listener`` once with the error that says why, when the
        engine's own processes die after loading (ENGINE_OOM_KILLED or
        ENGINE_DIED). Engines without processes of their own never call it."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the model and the engine's processes."""

    def sleep_unsupported(self) -> str:
        """Why this engine cannot sleep ("" when it can; rbee_worker/sleep.py)."""
        return "this engine has no sleep mode"

    async def sleep(self, level: int) -> None:
        """Free the device memory of the model (level 1: weights to CPU memory, KV cache dropped)."""
        raise NotImplementedError

    async def wake_up(self) -> None:
        """Bring the weights back and rebuild the KV cache after sleep()."""
        raise NotImplementedError


def load_failed(model: str, exc: BaseException) -> RbeeError:
    if isinstance(exc, RbeeError):
        return exc
    return RbeeError(
        "MODEL_LOAD_FAILED",
        f"Loading model {model} failed: {type(exc).__name__}: {exc}",
        {"model_path": model},
        ["Check the worker's log above for the engine's own error", "Check that the model folder is complete"],
    )
