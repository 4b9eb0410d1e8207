"""`infer --system/--chat/--json-schema/--logprobs/--n`: checked before
sending, mapped onto GenerateRequest, and the answers shown — against the real
worker servicer with the fake engine."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import inference_pb2
from rbee_keeper.direct import DirectInference, build_request
from rbee_keeper.interrupts import Interrupts
from rbee_keeper.render import TokenPrinter
from rbee_keeper.validation import validate_sampling
from rbee_keeper.worker_client import WorkerClient
from tests.fixtures.common import VENV_BIN, proc_env
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import KEY, worker_harness

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}


def _write(tmp_path: Path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _refused(option: str, **kwargs) -> RbeeError:
    kwargs.setdefault("prompt", "hi")
    kwargs.setdefault("max_tokens", 8)
    with pytest.raises(RbeeError) as info:
        validate_sampling(**kwargs)
    assert info.value.code == "INVALID_ARGUMENT"
    assert option in info.value.message
    assert info.value.suggestions
    return info.value


# -- validation ---------------------------------------------------------------------


def test_system_and_prompt_make_a_conversation():
    args = validate_sampling("Why do bees dance?", 8, system="Be brief.")
    assert args.messages == (("system", "Be brief."), ("user", "Why do bees dance?"))


def test_chat_file_then_prompt(tmp_path):
    chat = _write(tmp_path, "chat.json", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    args = validate_sampling("And bees?", 8, chat=chat, system="S")
    assert args.messages == (("system", "S"), ("user", "Hi"), ("assistant", "Hello!"), ("user", "And bees?"))
    # An object with "messages" works too, and --prompt may be left out.
    wrapped = _write(tmp_path, "wrapped.json", {"messages": [{"role": "user", "content": "Hi"}]})
    assert validate_sampling(None, 8, chat=wrapped).messages == (("user", "Hi"),)


def test_chat_from_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('[{"role": "user", "content": "from stdin"}]'))
    assert validate_sampling(None, 8, chat="-").messages == (("user", "from stdin"),)


def test_json_schema_logprobs_n(tmp_path):
    schema = _write(tmp_path, "schema.json", SCHEMA)
    args = validate_sampling("hi", 8, json_schema=schema, logprobs="3", n="2", temperature="0.8", seed="9")
    assert json.loads(args.json_schema) == SCHEMA
    assert (args.logprobs, args.n, args.seed) == (3, 2, 9)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("--chat", dict(chat="/nonexistent/chat.json")),
        ("--chat", dict(chat="BAD_JSON")),
        ("--chat", dict(chat="NOT_A_LIST")),
        ("--chat", dict(chat="BAD_ROLE")),
        ("--chat", dict(prompt=None, chat="ONLY_SYSTEM")),
        ("--raw-prompt", dict(system="x", raw_prompt=True)),
        ("--system", dict(system="  ")),
        ("--json-schema", dict(json_schema="/nonexistent/schema.json")),
        ("--json-schema", dict(json_schema="BAD_JSON")),
        ("--json-schema", dict(json_schema="NOT_AN_OBJECT")),
        ("--logprobs", dict(logprobs="21")),
        ("--logprobs", dict(logprobs="-1")),
        ("--logprobs", dict(logprobs="many")),
        ("--n", dict(n="0")),
        ("--n", dict(n="2", temperature="0")),
        ("--seed", dict(seed="-5")),
    ],
)
def test_refusals_name_the_option(tmp_path, option, kwargs):
    files = {
        "BAD_JSON": _write(tmp_path, "bad.json", "{nope"),
        "NOT_A_LIST": _write(tmp_path, "obj.json", {"role": "user"}),
        "BAD_ROLE": _write(tmp_path, "role.json", [{"role": "robot", "content": "x"}]),
        "ONLY_SYSTEM": _write(tmp_path, "sys.json", [{"role": "system", "content": "x"}]),
        "NOT_AN_OBJECT": _write(tmp_path, "list.json", [1, 2]),
    }
    kwargs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    _refused(option, **kwargs)


def test_build_request_maps_the_new_options(tmp_path):
    args = validate_sampling(
        "q", 8, system="S", json_schema=_write(tmp_path, "s.json", SCHEMA), logprobs=2, n=3, temperature=0.5
    )
    req = build_request(args, "rid")
    assert req.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "S"), ("user", "q")]
    assert req.WhichOneof("constraint") == "json_schema" and json.loads(req.json_schema) == SCHEMA
    assert (req.logprobs, req.n, req.temperature) == (2, 3, 0.5)
    plain = build_request(validate_sampling("q", 8), "rid")
    assert plain.WhichOneof("input") == "prompt"
    for name in ("logprobs", "n", "temperature", "seed"):
        assert not plain.HasField(name)


async def test_checked_before_anything_is_contacted(tmp_path):
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), "infer", "--worker", "127.0.0.1:9", "--prompt", "hi", "--logprobs", "99",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=proc_env(HOME=str(tmp_path), RBEE_HOME=str(tmp_path / "rbee"), RBEE_API_KEY="k"),
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1
    assert "--logprobs" in err.decode() and "127.0.0.1:9" not in err.decode()


# -- through the worker ---------------------------------------------------------------


async def _run(args, *, printer_out=None) -> tuple[DirectInference, str, str]:
    engine = FakeEngine(max_model_len=256)
    async with worker_harness(engine) as h:
        err = io.StringIO()
        out = printer_out if printer_out is not None else io.StringIO()
        narrate = Narrator("rbee-keeper", stream=err)
        async with WorkerClient(h.address, KEY, "test") as client:
            session = DirectInference(client, args, narrate, TokenPrinter(out), Interrupts(narrate))
            assert await session.run() == 0
        return session, out.getvalue(), err.getvalue()


async def test_n_answers_the_first_streams_the_others_follow():
    session, out, err = await _run(validate_sampling("hi", 3, n=2, temperature=0.9))
    assert out == "t1 t2 t3 \n\nt1 t2 t3 \n"
    assert "Answer 2 of 2 follows" in err


async def test_logprobs_are_shown_on_stderr():
    session, out, err = await _run(validate_sampling("hi", 2, logprobs=2))
    assert out == "t1 t2 \n"
    assert [e["token_id"] for e in session.logprobs] == [1001, 1002]
    assert session.logprobs[0]["top"][0]["logprob"] >= session.logprobs[0]["top"][1]["logprob"]
    assert "🔢 't1' -0.100 (alternatives: 'o1' -1.100)" in err
