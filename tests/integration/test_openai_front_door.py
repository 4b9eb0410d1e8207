"""The queen's OpenAI-compatible front door with the official ``openai``
client, against a real queen, node, hive and vLLM worker of the default
model (one shared cluster, tests/fixtures/cluster.py)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.cluster import Cluster

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine]

CHAT = [{"role": "user", "content": "Name three flowers that honey bees like."}]
SHORT_NAME = "SmolLM2-135M-Instruct"


def client(cluster: Cluster, key: str | None = None, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.base_url, api_key=key or cluster.admin_key, max_retries=0, timeout=300, **kw)


async def test_models_list_names_each_model_once_with_where_it_is(cluster: Cluster) -> None:
    models = (await client(cluster).models.list()).data
    ids = [m.id for m in models]
    assert ids.count(cluster.model) == 1
    [ours] = [m for m in models if m.id == cluster.model]
    assert ours.object == "model" and ours.owned_by == "rbee"
    extra = ours.model_dump()
    assert extra["loaded_on"] == [cluster.node] and extra["downloaded_on"] == [cluster.node]
    assert extra["name"] == SHORT_NAME
    got = await client(cluster).models.retrieve(cluster.model)
    assert got.id == cluster.model


async def test_chat_streamed_equals_chat_whole_with_the_same_seed(cluster: Cluster) -> None:
    c = client(cluster)
    args = dict(model=SHORT_NAME, messages=CHAT, temperature=0, seed=7, max_tokens=24)
    whole = await c.chat.completions.create(**args)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = await c.chat.completions.create(**args, stream=True)
    parts, reasons, roles = [], [], []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.model == SHORT_NAME
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            roles.append(ch.delta.role)
            reasons.append(ch.finish_reason)
    assert "".join(parts) == choice.message.content
    assert roles[0] == "assistant" and reasons[-1] == choice.finish_reason and set(reasons[:-1]) == {None}


async def test_completions_whole_and_streamed(cluster: Cluster) -> None:
    c = client(cluster)
    args = dict(model=cluster.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = await c.completions.create(**args)
    assert whole.object == "text_completion"
    [choice] = whole.choices
    assert choice.text and choice.finish_reason == "length" and whole.usage.completion_tokens == 8
    text = ""
    async for chunk in await c.completions.create(**args, stream=True):
        assert chunk.object == "text_completion"
        text += "".join(ch.text for ch in chunk.choices)
    assert text == choice.text


async def test_two_completions_and_a_stop_string(cluster: Cluster) -> None:
    c = client(cluster)
    two = await c.chat.completions.create(model=cluster.model, messages=CHAT, n=2, temperature=0.9, seed=3, max_tokens=12)
    assert sorted(ch.index for ch in two.choices) == [0, 1]
    assert all(ch.message.content for ch in two.choices)
    free = await c.chat.completions.create(model=cluster.model, messages=CHAT, temperature=0, max_tokens=24)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = await c.chat.completions.create(model=cluster.model, messages=CHAT, temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


async def test_json_schema_output_validates(cluster: Cluster) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = await client(cluster).chat.completions.create(
        model=cluster.model, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Describe a person as JSON with a name and an age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)


async def test_logprobs_with_top_logprobs_and_usage_in_the_stream(cluster: Cluster) -> None:
    c = client(cluster)
    reply = await c.chat.completions.create(model=cluster.model, messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for pos in content:
        assert pos.logprob <= 0 and len(pos.top_logprobs) == 3
        assert pos.top_logprobs[0].token == pos.token  # greedy: the likeliest token is the one chosen
        assert bytes(pos.bytes).decode(errors="replace") == pos.token
    legacy = await c.completions.create(model=cluster.model, prompt="Bees like", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == legacy.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    chunks = [ch async for ch in await c.chat.completions.create(
        model=cluster.model, messages=CHAT, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True})]  # fmt: skip
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert all(ch.usage is None for ch in body)


async def test_errors_are_the_clients_own_exceptions(cluster: Cluster) -> None:
    with pytest.raises(openai.AuthenticationError):
        await client(cluster, key="not-a-key").models.list()
    with pytest.raises(openai.NotFoundError) as nf:
        await client(cluster).chat.completions.create(model="no-such-model", messages=CHAT)
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        await client(cluster).chat.completions.create(model=cluster.model, messages=CHAT, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as bad:
        await client(cluster).chat.completions.create(model=cluster.model, messages=CHAT, tools=[tool])
    assert bad.value.body["param"] == "tools"
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as bad:
        await client(cluster).chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": image}])
    assert bad.value.body["param"] == "messages[0].content[0].type"


async def test_raw_sse_lines(cluster: Cluster) -> None:
    body = {"model": cluster.model, "messages": CHAT, "max_tokens": 8, "stream": True}
    headers = {"Authorization": f"Bearer {cluster.admin_key}"}
    async with httpx.AsyncClient(timeout=300) as http:
        async with http.stream("POST", f"{cluster.base_url}/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            text = "".join([part async for part in resp.aiter_text()])
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    for event in events:
        for line in event.split("\n"):
            assert line.startswith("data: ") or line.startswith(":"), line
    data = [e[len("data: "):] for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    for item in data[:-1]:
        assert json.loads(item)["object"] == "chat.completion.chunk"


async def test_an_application_key_chats_is_refused_admin_routes_and_revoked_at_once(cluster: Cluster) -> None:
    code, key, err = await cluster.queen.keeper("keys", "create", "--name", "front-door-test")
    assert code == 0, err
    key = key.strip()
    app = client(cluster, key=key)
    reply = await app.chat.completions.create(model=cluster.model, messages=CHAT, max_tokens=2)
    assert reply.choices[0].message.content is not None
    code, listed, err = await cluster.queen.keeper("keys", "list", "--json")
    assert code == 0 and key not in listed and "front-door-test" in listed
    # An inference key may not act as an admin (stop a worker through the web page's routes).
    root = openai.AsyncOpenAI(base_url=cluster.root_url, api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        await root.post("/api/web/workers/stop", cast_to=object, body={"node": cluster.node, "worker_id": "nobody"})
    code, _out, err = await cluster.queen.keeper("keys", "revoke", "front-door-test")
    assert code == 0, err
    with pytest.raises(openai.AuthenticationError):
        await app.chat.completions.create(model=cluster.model, messages=CHAT, max_tokens=2)
    await root.close()
    await app.close()
