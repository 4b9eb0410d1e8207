"""Steps for openai_front_door.feature: a real queen-rbee serving its HTTP
API, this machine as a local node whose hive spawns the stand-in worker, and
applications speaking to the queen with the official openai client or raw
HTTP (httpx)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from features.steps.queen_task_support import MODEL_REF, STANDIN_TEXT, TaskWorld, session_loop, world  # noqa: F401 - fixtures
from tests.fixtures.hive import free_port_block

scenarios("openai_front_door.feature")

ANSWER = STANDIN_TEXT
CHAT = [{"role": "user", "content": "hi"}]




def _base(world: TaskWorld) -> str:
    return f"http://127.0.0.1:{world.http['port']}"


def _key(world: TaskWorld) -> str:
    return (world.queen.home / "queen.key").read_text().strip()


def _headers(world: TaskWorld) -> dict[str, str]:
    return {"Authorization": f"Bearer {_key(world)}"}


def _start(world: TaskWorld, **env: str) -> None:
    port = free_port_block(1)
    world.http["port"] = port
    world.start_queen(RBEE_QUEEN_HTTP_PORT=str(port), **env)


@given(parsers.parse('the hub-like server serves the model "{ref}"'))
def _hub_serves(world, ref):
    assert ref == MODEL_REF, f"the scenarios serve {MODEL_REF} only"
    world.serve_model()


@given(parsers.parse('this machine is registered as the local node "{name}"'))
def _local_node(world, name):
    world.add_local_nodes(name)


@given("a running queen serving its HTTP API, whose hives run the stand-in worker and download from the hub-like server")
def _queen(world):
    _start(world)


@given(parsers.parse("a running queen serving its HTTP API that waits at most {wait} for a cold start, "
                     "whose workers take {load:d} s to load"))  # fmt: skip
def _queen_slow(world, wait, load):
    world.env["STANDIN_LOAD_S"] = str(load)
    _start(world, RBEE_QUEEN_HTTP_COLD_START_WAIT=wait)


def _stream(world: TaskWorld, model: str) -> str:
    body = {"model": model, "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{_base(world)}/v1/chat/completions", json=body, headers=_headers(world)) as resp:
            assert resp.status_code == 200, resp.read()
            return "".join(resp.iter_text())


@when(parsers.parse('two applications stream a chat with the model "{model}" at the same time'))
def _two_streams(world, model):
    with ThreadPoolExecutor(2) as pool:
        world.http["streams"] = list(pool.map(lambda _i: _stream(world, model), range(2)))


@then("both streams show loading comments before their first data event")
def _comments(world):
    for text in world.http["streams"]:
        events = [e for e in text.split("\n\n") if e]
        first_data = next(i for i, e in enumerate(events) if e.startswith("data: "))
        assert first_data > 0 and all(e.startswith(": ") for e in events[:first_data]), text
        assert any("loading hf:rbee-test/tiny on here" in e for e in events[:first_data]), text


@then(parsers.parse('both streams carry the stand-in\'s answer in chat chunks and end with "{last}"'))
def _answers(world, last):
    for text in world.http["streams"]:
        assert text.endswith(last + "\n\n"), text
        data = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")][:-1]
        chunks = [json.loads(d) for d in data]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == ANSWER


@then(parsers.parse('one worker process runs for node "{name}"'))
def _one_worker(world, name):
    assert len(world.worker_pids(name)) == 1


@then(parsers.parse('the model list names "{ref}" once, loaded on "{loaded}" and downloaded on "{downloaded}"'))
def _model_list(world, ref, loaded, downloaded):
    with openai.OpenAI(base_url=f"{_base(world)}/v1", api_key=_key(world), max_retries=0) as client:
        models = [m.model_dump() for m in client.models.list().data]
    ours = [m for m in models if m["id"] == ref]
    assert len(ours) == 1, models
    assert ours[0]["loaded_on"] == [loaded] and ours[0]["downloaded_on"] == [downloaded]


def _chat(world: TaskWorld, model: str):
    with openai.OpenAI(base_url=f"{_base(world)}/v1", api_key=_key(world), max_retries=0, timeout=60) as client:
        return client.chat.completions.create(model=model, messages=CHAT, max_tokens=3)


@then(parsers.parse('a chat with the short name "{name}" gets the stand-in\'s answer from the warm worker'))
def _short_name(world, name):
    pids = world.worker_pids("here")
    reply = _chat(world, name)
    assert reply.choices[0].message.content == ANSWER and reply.object == "chat.completion"
    assert world.worker_pids("here") == pids


@when(parsers.parse('an application asks for a chat with the model "{model}" without streaming'))
def _ask(world, model):
    body = {"model": model, "messages": CHAT, "max_tokens": 3}
    world.http["response"] = httpx.post(f"{_base(world)}/v1/chat/completions", json=body, headers=_headers(world), timeout=60)


def _error_shape(resp: httpx.Response) -> dict:
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@then("it gets status 503 with a Retry-After header and an error in OpenAI's shape")
def _503(world):
    resp = world.http["response"]
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0
    assert _error_shape(resp)["code"] == "cold_start_timeout"


@then("once the worker is loaded, the same request gets the stand-in's answer")
def _then_served(world):
    deadline = time.monotonic() + 60
    while True:
        try:
            reply = _chat(world, MODEL_REF)
            break
        except openai.InternalServerError:  # 503 while it still loads
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert reply.choices[0].message.content == ANSWER
    assert len(world.worker_pids("here")) == 1


@when("an application asks for the model list without a key")
def _no_key(world):
    world.http["response"] = httpx.get(f"{_base(world)}/v1/models", timeout=30)


@then("it gets status 401 with an error in OpenAI's shape")
def _401(world):
    resp = world.http["response"]
    assert resp.status_code == 401
    assert _error_shape(resp)["type"] == "authentication_error"


@then("the client library raises its AuthenticationError for a wrong key")
def _wrong_key(world):
    with openai.OpenAI(base_url=f"{_base(world)}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


@then("GET /health answers 200 without a key")
def _health(world):
    assert httpx.get(f"{_base(world)}/health", timeout=30).status_code == 200
