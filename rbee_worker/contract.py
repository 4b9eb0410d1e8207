"""GenerateRequest → engine-neutral options, and engine outputs → wire messages.

Everything checked here needs no engine call, so a bad request is refused
before it takes a slot or reaches the tokenizer; each refusal is
INVALID_ARGUMENT with details["field"] naming the GenerateRequest field.
The one check that needs the prompt's token count (``max_tokens_for``: the
prompt and max_tokens against the model's context) runs once the prompt is
tokenized.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rbee.bounds import (
    CANCEL_IDS, CHAT_MESSAGES, CHOICE_BYTES, CHOICES, DEFAULT_CONTEXT, GRAMMAR_BYTES, LOGIT_BIAS, REGEX_BYTES, REQUEST_ID,
    STOP_TOKEN_IDS, Bound, check_json_schema_text, check_stops, prompt_bound, utf8_len,
)  # fmt: skip
from rbee.errors import RbeeError
from rbee.v1 import inference_pb2
from rbee_worker.engine import ABORT, LENGTH, STOP, Constraint, EngineInfo, PositionLogprobs, SamplingOptions, TokenLogprob

# What an unset sampling field becomes when the model's generation config
# says nothing: vLLM's SamplingParams defaults.
ENGINE_DEFAULTS: dict[str, float] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Request ids (GenerateRequest.request_id, CancelRequest.request_id(s)) are
# echoed in replies and written to the log: 1 to 128 characters of printable
# ASCII without spaces ('!' to '~'), so no id can forge log lines, hide in
# look-alike characters or fill the log. Every bound: rbee/bounds.py.
MAX_REQUEST_ID_LEN = REQUEST_ID.limit
REQUEST_ID_CHARS = "printable ASCII without spaces ('!' to '~')"
MAX_CANCEL_IDS = CANCEL_IDS.limit
MAX_TEMPERATURE = 2.0
MAX_LOGIT_BIAS = 100.0

FINISH_REASONS = {
    STOP: inference_pb2.FINISH_REASON_STOP,
    LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    ABORT: inference_pb2.FINISH_REASON_ABORT,
}


def invalid(field: str, message: str, **details: object) -> RbeeError:
    return RbeeError("INVALID_ARGUMENT", f"Invalid {field}: {message}", {"field": field, **details})


@dataclass(frozen=True)
class ParsedRequest:
    # "prompt", "chat" or "token_ids"
    input_kind: str
    prompt: str = ""
    raw_prompt: bool = False
    messages: tuple[dict[str, str], ...] = ()
    token_ids: tuple[int, ...] = ()
    # None: as many as the context leaves (resolved once the prompt is tokenized).
    max_tokens: int | None = None
    # Options with max_tokens 0 until resolved.
    options: SamplingOptions = SamplingOptions(max_tokens=0)


def check_request_id(value: str, field: str = "request_id", **details: object) -> str:
    """``value`` if it is a valid request id; else INVALID_ARGUMENT naming ``field``.
    The empty string passes (the caller decides what empty means)."""
    if len(value) > MAX_REQUEST_ID_LEN:
        raise invalid(
            field, f"{len(value)} characters; at most {MAX_REQUEST_ID_LEN}",
            length=len(value), max_length=MAX_REQUEST_ID_LEN, **details,
        )  # fmt: skip
    for i, ch in enumerate(value):
        if not "!" <= ch <= "~":
            raise invalid(
                field, f"character {i} is {ch!r} (U+{ord(ch):04X}); use {REQUEST_ID_CHARS}",
                position=i, allowed=REQUEST_ID_CHARS, **details,
            )  # fmt: skip
    return value


def check_cancel_ids(request_id: str, request_ids: Sequence[str]) -> list[str]:
    """CancelRequest's ids, each checked, without duplicates or empties."""
    CANCEL_IDS.check(len(request_ids), suggestion="Cancel them in several calls")
    check_request_id(request_id, "request_id")
    for i, rid in enumerate(request_ids):
        check_request_id(rid, "request_ids", index=i)
    return list(dict.fromkeys(i for i in (request_id, *request_ids) if i))


def defaults(info: EngineInfo | None) -> dict[str, float]:
    return {**ENGINE_DEFAULTS, **(dict(info.defaults) if info else {})}


def _opt(request: inference_pb2.GenerateRequest, name: str):
    return getattr(request, name) if request.HasField(name) else None


def _check_range(name: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise invalid(name, f"must be in {bracket}{low:g}, {high:g}] (got {value:g})", value=f"{value:g}")


def _vocab_check(name: str, ids: Sequence[int], info: EngineInfo | None) -> None:
    vocab = info.vocab_size if info else 0
    if vocab:
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise invalid(name, f"token id {bad[0]} is outside the vocabulary (size {vocab})", token_id=bad[0], vocab_size=vocab)


def _input(request: inference_pb2.GenerateRequest, info: EngineInfo | None) -> dict:
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid("prompt", "give the input as prompt, chat or token_ids")
    if request.raw_prompt and kind != "prompt":
        raise invalid("raw_prompt", f"applies to prompt only, not to {kind}")
    context = info.max_model_len if info and info.max_model_len else DEFAULT_CONTEXT
    # Text that cannot fit the context is refused before anything tokenizes it.
    text_bound = prompt_bound(context)
    too_long = f"Shorten it: the model's context of {context} tokens holds at most {text_bound.limit} bytes of text"
    if kind == "prompt":
        text_bound.check(utf8_len(request.prompt), suggestion=too_long, max_model_len=context)
        if not request.prompt.strip():
            raise invalid("prompt", "the prompt is empty")
        return {"input_kind": kind, "prompt": request.prompt, "raw_prompt": request.raw_prompt}
    if kind == "chat":
        messages = request.chat.messages
        if not messages:
            raise invalid("chat", "the conversation has no messages")
        CHAT_MESSAGES.check(len(messages))
        total = sum(utf8_len(m.content) for m in messages)
        text_bound.check(total, "chat", too_long, max_model_len=context)
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise invalid("chat", f"message {i} has role {m.role!r}; use one of {', '.join(CHAT_ROLES)}", index=i)
        if info is not None and not info.has_chat_template:
            raise invalid("chat", "this model has no chat template; send prompt (raw) or token_ids")
        return {"input_kind": kind, "messages": tuple({"role": m.role, "content": m.content} for m in messages)}
    ids = request.token_ids.ids
    if not ids:
        raise invalid("token_ids", "no token ids")
    Bound("token_ids", context - 1, "ids", "the context").check(len(ids), max_model_len=context)
    ids = tuple(ids)
    _vocab_check("token_ids", ids, info)
    return {"input_kind": kind, "token_ids": ids}


def _constraint(request: inference_pb2.GenerateRequest) -> Constraint | None:
    kind = request.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choice":
        CHOICES.check(len(request.choice.choices))
        choices = tuple(request.choice.choices)
        for i, c in enumerate(choices):
            CHOICE_BYTES.check(utf8_len(c), index=i)
        if not choices:
            raise invalid("choice", "give at least one choice")
        if any(not c for c in choices):
            raise invalid("choice", "choices must not be empty strings")
        return Constraint(kind, choices)
    value = getattr(request, kind)
    if kind == "regex":
        REGEX_BYTES.check(utf8_len(value))
    elif kind == "grammar":
        GRAMMAR_BYTES.check(utf8_len(value))
    elif kind == "json_schema":
        # Size, then depth, before json.loads recurses into it.
        check_json_schema_text(value)
    if not value.strip():
        raise invalid(kind, "is empty")
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as exc:
            raise invalid(kind, f"is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise invalid(kind, f"must be a JSON object (got {type(schema).__name__})")
    return Constraint(kind, value)


def parse_request(request: inference_pb2.GenerateRequest, info: EngineInfo | None, slots: int) -> ParsedRequest:
    """Every check that needs no tokenizer; each error names its field."""
    check_request_id(request.request_id)
    source = _input(request, info)

    max_tokens = _opt(request, "max_tokens")
    if max_tokens is not None and max_tokens <= 0:
        raise invalid("max_tokens", f"must be at least 1 (got {max_tokens})", value=max_tokens)
    min_tokens = _opt(request, "min_tokens")
    if min_tokens is not None:
        if min_tokens < 0:
            raise invalid("min_tokens", f"must be 0 or more (got {min_tokens})", value=min_tokens)
        if max_tokens is not None and min_tokens > max_tokens:
            raise invalid("min_tokens", f"{min_tokens} is more than max_tokens {max_tokens}", value=min_tokens)

    temperature = _opt(request, "temperature")
    _check_range("temperature", temperature, 0.0, MAX_TEMPERATURE)
    top_p = _opt(request, "top_p")
    _check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = _opt(request, "top_k")
    if top_k is not None and top_k < 0:
        raise invalid("top_k", f"must be 0 (off) or more (got {top_k})", value=top_k)
    min_p = _opt(request, "min_p")
    _check_range("min_p", min_p, 0.0, 1.0)
    presence = _opt(request, "presence_penalty")
    _check_range("presence_penalty", presence, -2.0, 2.0)
    frequency = _opt(request, "frequency_penalty")
    _check_range("frequency_penalty", frequency, -2.0, 2.0)
    repetition = _opt(request, "repetition_penalty")
    _check_range("repetition_penalty", repetition, 0.0, 2.0, low_open=True)
    seed = _opt(request, "seed")
    if seed is not None and seed < 0:
        raise invalid("seed", f"must be 0 or more (got {seed})", value=seed)

    n = _opt(request, "n")
    if n is not None and not 1 <= n <= slots:
        raise invalid("n", f"must be between 1 and the worker's {slots} slots (got {n})", value=n, max_n=slots)
    n = n or 1
    if n > 1:
        effective = temperature if temperature is not None else defaults(info)["temperature"]
        if effective == 0:
            raise invalid("n", f"{n} completions need sampling: greedy decoding (temperature 0) gives one answer")

    check_stops(request.stop)
    STOP_TOKEN_IDS.check(len(request.stop_token_ids))
    LOGIT_BIAS.check(len(request.logit_bias))
    if any(not s for s in request.stop):
        raise invalid("stop", "stop strings must not be empty")
    _vocab_check("stop_token_ids", request.stop_token_ids, info)
    _vocab_check("logit_bias", list(request.logit_bias), info)
    for token_id, bias in request.logit_bias.items():
        if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise invalid("logit_bias", f"bias of token {token_id} must be in [-100, 100] (got {bias:g})", token_id=token_id)

    max_logprobs = info.max_logprobs if info else 20
    for name in ("logprobs", "prompt_logprobs"):
        k = _opt(request, name)
        if k is not None and not 0 <= k <= max_logprobs:
            raise invalid(name, f"must be between 0 and {max_logprobs} (got {k})", value=k, max_logprobs=max_logprobs)

    include_stop = _opt(request, "include_stop_str_in_output")
    skip_special = _opt(request, "skip_special_tokens")
    options = SamplingOptions(
        max_tokens=0,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        seed=seed,
        n=n,
        min_tokens=min_tokens or 0,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        include_stop_str_in_output=bool(include_stop),
        skip_special_tokens=True if skip_special is None else skip_special,
        ignore_eos=request.ignore_eos,
        logit_bias=dict(request.logit_bias),
        constraint=_constraint(request),
        logprobs=_opt(request, "logprobs"),
        prompt_logprobs=_opt(request, "prompt_logprobs"),
    )
    return ParsedRequest(max_tokens=max_tokens, options=options, **source)


def max_tokens_for(info: EngineInfo | None, prompt_tokens: int, max_tokens: int | None) -> int:
    """The request's max_tokens, or what the context leaves after the prompt,
    checked against the context once the prompt is tokenized."""
    limit = info.max_model_len if info else 0
    if max_tokens is None:
        check_length(prompt_tokens, 1, limit)
        room = limit - prompt_tokens if limit else 16
        model_default = int(defaults(info).get("max_tokens", 0))
        return min(room, model_default) if model_default else room
    check_length(prompt_tokens, max_tokens, limit)
    return max_tokens


def check_length(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    if not limit:
        return
    figures = {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "max_model_len": limit}
    if prompt_tokens >= limit:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid prompt: {prompt_tokens} prompt tokens leave no room in the model's "
            f"{limit}-token context",
            {"field": "prompt", **figures},
            ["Shorten the prompt"],
        )
    if prompt_tokens + max_tokens > limit:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid max_tokens: prompt tokens {prompt_tokens} + max_tokens {max_tokens} = "
            f"{prompt_tokens + max_tokens} exceeds the model's context of {limit} tokens",
            {"field": "max_tokens", **figures},
            [f"Use max_tokens of at most {limit - prompt_tokens}"],
        )


# -- outputs ---------------------------------------------------------------------


def _token(t: TokenLogprob) -> inference_pb2.TokenLogprob:
    return inference_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank, token=t.token)


def logprobs_to_proto(positions: Sequence[PositionLogprobs | None]) -> list[inference_pb2.PositionLogprobs]:
    out = []
    for p in positions:
        if p is None:
            out.append(inference_pb2.PositionLogprobs())
            continue
        msg = inference_pb2.PositionLogprobs(top=[_token(t) for t in p.top])
        if p.chosen is not None:
            msg.chosen.CopyFrom(_token(p.chosen))
        out.append(msg)
    return out


def set_matched_stop(msg, stop_reason: str | int | None, last_token: int | None) -> None:
    """Fill a message's matched_stop oneof: the stop string or token id, or
    the last token (end-of-sequence) when the engine names none."""
    if isinstance(stop_reason, str):
        msg.stop_string = stop_reason
    elif isinstance(stop_reason, int):
        msg.stop_token_id = stop_reason
    elif last_token is not None:
        msg.stop_token_id = last_token
