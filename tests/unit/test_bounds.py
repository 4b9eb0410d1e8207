"""The one table of request bounds (rbee/bounds.py), as the worker and the
keeper apply it: every repeated or free-form field past its bound is
INVALID_ARGUMENT naming the field and the bound, before any parser, template
or tokenizer sees it; a schema nested 100,000 deep is one of them (no
RecursionError, no INTERNAL)."""

from __future__ import annotations

import json

import pytest

from rbee.bounds import (
    BOUNDS, CHAT_MESSAGES, CHOICE_BYTES, CHOICES, GRAMMAR_BYTES, JSON_SCHEMA_BYTES, JSON_SCHEMA_DEPTH, LOGIT_BIAS,
    REGEX_BYTES, STOP, STOP_BYTES, STOP_TOKEN_IDS, json_depth, prompt_bound, worker_receive_limit,
)  # fmt: skip
from rbee.errors import RbeeError
from rbee.v1 import inference_pb2
from rbee_keeper.validation import load_chat, load_json_schema, validate_sampling
from rbee_worker.contract import parse_request
from rbee_worker.engine import EngineInfo

INFO = EngineInfo(max_model_len=2048, engine_version="t", vocab_size=50_000, has_chat_template=True)
# 100,000 deep (what raised RecursionError inside json.loads): past the size bound.
DEEPEST = "[" * 100_000 + "]" * 100_000
# Within the size bound, thousands of levels deep.
DEEP = "[" * 30_000 + "]" * 30_000
DEEP_SCHEMA = '{"properties": {"a": ' * 1_500 + "{}" + "}}" * 1_500


def nested_schema(levels: int) -> str:
    """A schema whose JSON nests ``levels`` deep."""
    inner = '{"type": "string"}'
    for _ in range((levels - 1) // 2):
        inner = f'{{"type": "object", "properties": {{"a": {inner}}}}}'
    return inner


def refused(**fields) -> RbeeError:
    fields.setdefault("prompt", "hi")
    with pytest.raises(RbeeError) as info:
        parse_request(inference_pb2.GenerateRequest(**fields), INFO, 8)
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value


CASES = [
    (dict(stop=["x"] * 200_000), STOP),
    (dict(stop=["x" * (STOP_BYTES.limit + 1)]), STOP_BYTES),
    (dict(stop_token_ids=[1] * (STOP_TOKEN_IDS.limit + 1)), STOP_TOKEN_IDS),
    (dict(logit_bias={i: 1.0 for i in range(LOGIT_BIAS.limit + 1)}), LOGIT_BIAS),
    (dict(json_schema=json.dumps({"type": "object", "description": "x" * 30_000_00})), JSON_SCHEMA_BYTES),
    (dict(json_schema=DEEP_SCHEMA), JSON_SCHEMA_DEPTH),
    (dict(json_schema=DEEP), JSON_SCHEMA_DEPTH),
    (dict(json_schema=DEEPEST), JSON_SCHEMA_BYTES),
    (dict(regex="a" * (REGEX_BYTES.limit + 1)), REGEX_BYTES),
    (dict(grammar="r ::= " + "a" * GRAMMAR_BYTES.limit), GRAMMAR_BYTES),
    (dict(choice=inference_pb2.ChoiceConstraint(choices=["a"] * (CHOICES.limit + 1))), CHOICES),
    (dict(choice=inference_pb2.ChoiceConstraint(choices=["é" * CHOICE_BYTES.limit])), CHOICE_BYTES),
]


@pytest.mark.parametrize(("fields", "bound"), CASES, ids=[f"{b.field}-{b.unit}" for _, b in CASES])
def test_the_worker_refuses_each_field_past_its_bound(fields, bound):
    err = refused(**fields)
    assert err.details["field"] == bound.field
    assert err.details["limit"] == str(bound.limit) and err.details["unit"] == bound.unit
    assert f"Invalid {bound.field}:" in err.message and f"at most {bound.limit}" in err.message
    assert "Recursion" not in err.message


def test_every_bound_holds_at_its_limit():
    fine = parse_request(inference_pb2.GenerateRequest(
        prompt="p" * prompt_bound(INFO.max_model_len).limit, stop=["s" * STOP_BYTES.limit] * STOP.limit,
        stop_token_ids=[1] * STOP_TOKEN_IDS.limit, logit_bias={i: 1.0 for i in range(LOGIT_BIAS.limit)},
        json_schema=nested_schema(JSON_SCHEMA_DEPTH.limit),
    ), INFO, 8)  # fmt: skip
    assert len(fine.options.stop) == STOP.limit
    assert JSON_SCHEMA_DEPTH.limit - 1 <= json_depth(nested_schema(JSON_SCHEMA_DEPTH.limit)) <= JSON_SCHEMA_DEPTH.limit
    refused(json_schema=nested_schema(JSON_SCHEMA_DEPTH.limit + 2))


def test_the_largest_valid_request_fits_the_workers_receive_limit():
    biggest = inference_pb2.GenerateRequest(
        request_id="r" * 128, prompt="é" * (prompt_bound(INFO.max_model_len).limit // 2),
        stop=["s" * STOP_BYTES.limit] * STOP.limit, stop_token_ids=[2**31] * STOP_TOKEN_IDS.limit,
        logit_bias={2**31 + i: 1.0 for i in range(LOGIT_BIAS.limit)},
        choice=inference_pb2.ChoiceConstraint(choices=["c" * CHOICE_BYTES.limit] * CHOICES.limit),
    )  # fmt: skip
    assert biggest.ByteSize() < worker_receive_limit(INFO.max_model_len)
    chat = inference_pb2.GenerateRequest(chat=inference_pb2.ChatInput(messages=[
        inference_pb2.ChatMessage(role="assistant", content="x" * (prompt_bound(2048).limit // CHAT_MESSAGES.limit))
    ] * CHAT_MESSAGES.limit))  # fmt: skip
    assert chat.ByteSize() < worker_receive_limit(2048)


def test_the_table_names_each_bound_once():
    assert len({(b.field, b.unit) for b in BOUNDS}) == len(BOUNDS)
    assert all(b.limit > 0 and b.why for b in BOUNDS)


# -- the keeper, before it sends -------------------------------------------------


def test_the_keeper_refuses_too_many_stop_strings():
    with pytest.raises(RbeeError) as info:
        validate_sampling("hi", "8", stop=["x"] * (STOP.limit + 1))
    assert info.value.details["field"] == "--stop" and info.value.details["limit"] == str(STOP.limit)
    assert f"at most {STOP.limit}" in info.value.message


@pytest.mark.parametrize("text", [DEEP, DEEP_SCHEMA, DEEPEST, json.dumps({"d": "x" * (JSON_SCHEMA_BYTES.limit + 1)})])
def test_the_keeper_refuses_a_huge_or_deep_schema_file(tmp_path, text):
    path = tmp_path / "schema.json"
    path.write_text(text)
    with pytest.raises(RbeeError) as info:
        load_json_schema(str(path))
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details["field"] == "--json-schema"
    assert info.value.details["unit"] in ("bytes", "levels of nesting")


def test_the_keeper_refuses_a_conversation_of_too_many_messages(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}] * (CHAT_MESSAGES.limit + 1)))
    with pytest.raises(RbeeError) as info:
        load_chat(str(path))
    assert info.value.details["field"] == "--chat" and info.value.details["limit"] == str(CHAT_MESSAGES.limit)
