"""Request bodies of the OpenAI routes, with the parameters vLLM's own
OpenAI server accepts (its extras too). Ranges are checked here so the error
names the parameter; what rbee cannot do (tools, audio, images, several
prompts in one request) is refused with 400 naming it. Unknown parameters are
ignored, as vLLM's server does."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rbee.bounds import CHAT_MESSAGES
from rbee.errors import RbeeError

# Bounds that keep one request's size sane (the worker checks its own too).
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_N = 128
MAX_LOGIT_BIAS = 1024
MAX_SCHEMA_CHARS = 65536


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    # "schema" is a BaseModel attribute name; the JSON key is kept.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class Sampling(_Body):
    """What both routes share."""

    model: str = Field(..., min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    ignore_eos: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    request_id: str | None = None
    # Ollama's: how long the worker stays loaded once idle (docs/queen.md,
    # "Idle memory"): a duration ("5m") or seconds; 0 = stop it after this
    # answer; negative = never. Seconds after validation (inf for never).
    keep_alive: Any = None

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float | None:
        from rbee_queen.keepalive import parse_keep_alive

        try:
            return parse_keep_alive(value, "keep_alive")
        except RbeeError as err:
            raise ValueError(err.message) from None


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str = Field(..., min_length=1, max_length=64)
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Present when a client replays an assistant turn that called tools.
    tool_calls: list[Any] | None = None


class ChatCompletionRequest(Sampling):
    # The worker's bound (rbee/bounds.py), checked here before 8 MiB of tiny messages become 300,000 objects.
    messages: list[Message] = Field(..., min_length=1, max_length=CHAT_MESSAGES.limit)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Refused (400 naming them) when given: rbee has no tool calling, audio or images.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
