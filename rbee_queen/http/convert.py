"""OpenAI request bodies → the worker's GenerateRequest (docs/inference-api.md)."""

from __future__ import annotations

import json
import secrets

from rbee.v1 import inference_pb2

from rbee_queen.http.errors import bad_request
from rbee_queen.http.openai_models import (
    MAX_LOGIT_BIAS, MAX_SCHEMA_CHARS, MAX_STOP, MAX_STOP_CHARS, ChatCompletionRequest, CompletionRequest, Sampling,
)  # fmt: skip

# OpenAI's default max_tokens for /v1/completions (chat has none).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _unsupported(param: str, what: str) -> Exception:
    return bad_request(f"{param}: {what} is not supported by rbee", param, "unsupported_parameter")


def _sampling(body: Sampling, req: inference_pb2.GenerateRequest) -> None:
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "min_tokens", "include_stop_str_in_output", "skip_special_tokens"):  # fmt: skip
        value = getattr(body, name)
        if value is not None:
            setattr(req, name, value)
    if body.n is not None and body.n != 1:
        req.n = body.n
    if body.ignore_eos:
        req.ignore_eos = True
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters", "stop")
    req.stop.extend(stops)
    ids = body.stop_token_ids or []
    if len(ids) > MAX_STOP or any(i < 0 for i in ids):
        raise bad_request(f"stop_token_ids: at most {MAX_STOP} token ids, each 0 or more", "stop_token_ids")
    req.stop_token_ids.extend(ids)
    if body.logit_bias:
        if len(body.logit_bias) > MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias: at most {MAX_LOGIT_BIAS} entries", "logit_bias")
        for token, bias in body.logit_bias.items():
            if not token.isdigit() or len(token) > 9:
                raise bad_request("logit_bias: keys are token ids (digits)", "logit_bias")
            if not -100 <= bias <= 100:
                raise bad_request("logit_bias: each bias is between -100 and 100", "logit_bias")
            req.logit_bias[int(token)] = bias
    _constraint(body, req)
    if body.request_id:
        req.request_id = body.request_id


def _schema_text(value, param: str) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_SCHEMA_CHARS:
        raise bad_request(f"{param}: the schema is longer than {MAX_SCHEMA_CHARS} characters", param)
    return text


def _constraint(body: Sampling, req: inference_pb2.GenerateRequest) -> None:
    chosen: list[str] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        req.json_schema = JSON_OBJECT_SCHEMA
        chosen.append("response_format")
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request("response_format.json_schema.schema is required with type json_schema",
                              "response_format.json_schema")  # fmt: skip
        req.json_schema = _schema_text(fmt.json_schema.json_schema, "response_format.json_schema")
        chosen.append("response_format")
    so = body.structured_outputs
    for param, value, field in (
        ("guided_json", body.guided_json, "json_schema"), ("guided_regex", body.guided_regex, "regex"),
        ("guided_grammar", body.guided_grammar, "grammar"), ("guided_choice", body.guided_choice, "choice"),
        ("structured_outputs.json", so and so.json_, "json_schema"), ("structured_outputs.regex", so and so.regex, "regex"),
        ("structured_outputs.grammar", so and so.grammar, "grammar"), ("structured_outputs.choice", so and so.choice, "choice"),
    ):  # fmt: skip
        if value is None:
            continue
        chosen.append(param)
        if field == "json_schema":
            req.json_schema = _schema_text(value, param)
        elif field == "choice":
            req.choice.choices.extend(value)
        else:
            setattr(req, field, value)
    if len(chosen) > 1:
        raise bad_request(f"{chosen[1]}: only one output constraint per request (also given: {chosen[0]})", chosen[1])


def chat_request(body: ChatCompletionRequest, request_id: str) -> inference_pb2.GenerateRequest:
    for param in ("tools", "functions"):
        if getattr(body, param):
            raise _unsupported(param, "tool calling")
    for param in ("tool_choice", "function_call"):
        if getattr(body, param) not in (None, "none"):
            raise _unsupported(param, "tool calling")
    if body.audio is not None or (body.modalities and any(m != "text" for m in body.modalities)):
        raise _unsupported("audio" if body.audio is not None else "modalities", "audio output")
    req = inference_pb2.GenerateRequest(request_id=request_id)
    for i, msg in enumerate(body.messages):
        role = ROLES.get(msg.role)
        if role is None:
            raise bad_request(f"messages[{i}].role: {msg.role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        if msg.tool_calls:
            raise _unsupported(f"messages[{i}].tool_calls", "tool calling")
        if isinstance(msg.content, list):
            texts = []
            for j, part in enumerate(msg.content):
                if part.type != "text":
                    raise _unsupported(f"messages[{i}].content[{j}].type", f"content of type {part.type!r} (images, audio, files)")
                texts.append(part.text or "")
            content = "".join(texts)
        else:
            content = msg.content or ""
        req.chat.messages.add(role=role, content=content)
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None:
        req.max_tokens = limit
    if body.logprobs:
        req.logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
    _sampling(body, req)
    return req


def completion_request(body: CompletionRequest, request_id: str) -> inference_pb2.GenerateRequest:
    if body.echo:
        raise _unsupported("echo", "echoing the prompt")
    if body.suffix:
        raise _unsupported("suffix", "a suffix (fill-in-the-middle)")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise _unsupported("best_of", "best_of other than n")
    req = inference_pb2.GenerateRequest(request_id=request_id)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt: one prompt per request (send one request per prompt)", "prompt", "unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
        req.raw_prompt = True
    else:
        if not prompt:
            raise bad_request("prompt: empty", "prompt")
        if any(i < 0 for i in prompt):
            raise bad_request("prompt: token ids are 0 or more", "prompt")
        req.token_ids.ids.extend(prompt)
    req.max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    if body.logprobs is not None:
        req.logprobs = body.logprobs
    _sampling(body, req)
    return req
