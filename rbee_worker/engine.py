"""The seam between the worker's servicer and an inference engine.

The servicer only speaks to this interface, so it is tested with a fake engine
and vLLM (or another backend) plugs in behind it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rbee.errors import RbeeError

# Unset temperature means "sample", as the proto documents; 0 is greedy.
DEFAULT_TEMPERATURE = 0.7

# Finish reasons on the wire (GenerateFinal.finish_reason).
STOP = "stop"
LENGTH = "length"
CANCELLED = "cancelled"
ERROR = "error"


@dataclass(frozen=True)
class EngineInfo:
    max_model_len: int
    engine_version: str
    # Sequences the engine schedules together (its own batch limit).
    max_num_seqs: int = 0


@dataclass(frozen=True)
class LoadProgress:
    """One loading stage: `done` of `total` stages, with a short message."""

    stage: str
    done: int
    total: int
    message: str = ""
    unit: str = "stages"


ProgressCallback = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False


@dataclass
class Delta:
    """What one engine step produced for one request: only the new tokens."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    # STOP, LENGTH, CANCELLED or ERROR when finished.
    finish_reason: str | None = None
    prompt_tokens: int = 0


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


class Engine(abc.ABC):
    """An inference engine serving one loaded model."""

    @abc.abstractmethod
    async def load(self, progress: ProgressCallback) -> EngineInfo:
        """Load the model, reporting stages; raise RbeeError(MODEL_LOAD_FAILED) on failure."""

    @abc.abstractmethod
    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        """Prompt token ids (chat-templated unless raw_prompt). Only after load()."""

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        """Deltas for one request; the last one has finished=True."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request; unknown or finished ids are ignored."""

    @abc.abstractmethod
    async def health(self) -> None:
        """Raise RbeeError when the engine can no longer serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the model and the engine's processes."""


def load_failed(model: str, exc: BaseException) -> RbeeError:
    if isinstance(exc, RbeeError):
        return exc
    return RbeeError(
        "MODEL_LOAD_FAILED",
        f"Loading model {model} failed: {type(exc).__name__}: {exc}",
        {"model_path": model},
        ["Check the worker's log above for the engine's own error", "Check that the model folder is complete"],
    )
