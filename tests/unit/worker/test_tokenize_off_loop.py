"""One long prompt does not freeze the worker: the chat template and the
tokenizer run on a thread of their own while the request holds its slot, and
text that cannot fit the context is refused before anything tokenizes it."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from rbee.bounds import CHAT_MESSAGES, PROMPT_BYTES_PER_TOKEN
from rbee.errors import from_rpc_error
from rbee.v1 import inference_pb2
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import worker_harness


class GatedTokenizer(FakeEngine):
    """Tokenizing waits for ``gate``; what happened, in order, is in ``events``."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.tokenizing = threading.Event()
        self.gate = threading.Event()
        self.events: list[str] = []

    def _hold(self) -> None:
        self.events.append("tokenizing")
        self.tokenizing.set()
        # Bounded, so that the old way (tokenizing on the event loop, which
        # this wait would freeze) ends in a failed assertion, not a hang.
        self.gate.wait(30)
        self.events.append("tokenized")

    def encode(self, prompt, raw_prompt):
        self._hold()
        return super().encode(prompt, raw_prompt)

    def encode_chat(self, messages):
        self._hold()
        return super().encode_chat(messages)


async def _drain(call) -> list:
    return [m async for m in call]


@pytest.mark.parametrize("chat", [False, True])
async def test_health_answers_while_a_prompt_is_tokenized(chat):
    engine = GatedTokenizer()
    async with worker_harness(engine, slots=1) as h:
        if chat:
            fields = dict(prompt=None, chat=inference_pb2.ChatInput(messages=[inference_pb2.ChatMessage(role="user", content="hi")]))
        else:
            fields = dict(prompt="a prompt that takes long to tokenize")
        streaming = asyncio.ensure_future(_drain(h.generate(request_id="long", **fields)))
        assert await asyncio.to_thread(engine.tokenizing.wait, 30)
        reply = await h.health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        engine.events.append("health answered")
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The request holds its slot while it is tokenized: a full worker
        # says so at once, without tokenizing the newcomer.
        assert (await h.readiness()).slots_busy == 1
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await _drain(h.generate(request_id="second"))
        assert from_rpc_error(busy.value).code == "ALL_SLOTS_BUSY"
        with pytest.raises(grpc.aio.AioRpcError) as dup:
            await _drain(h.generate(request_id="long"))
        assert from_rpc_error(dup.value).code == "DUPLICATE_REQUEST_ID"
        engine.gate.set()
        messages = await streaming
        assert messages[-1].final.reason == inference_pb2.FINISH_REASON_LENGTH
        assert engine.events == ["tokenizing", "health answered", "tokenized"]
        assert h.servicer.slots_busy == 0


async def test_a_client_gone_while_its_prompt_is_tokenized_frees_the_slot():
    engine = GatedTokenizer()
    async with worker_harness(engine, slots=1) as h:
        call = h.generate(request_id="gone")
        streaming = asyncio.ensure_future(_drain(call))
        assert await asyncio.to_thread(engine.tokenizing.wait, 30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await streaming
        # The slot is free as soon as the worker hears the client go, while
        # the tokenization still runs (held at the gate).
        for _ in range(3000):
            if h.servicer.slots_busy == 0:
                break
            await asyncio.sleep(0.01)
        assert h.servicer.slots_busy == 0 and not engine.gate.is_set(), "the worker did not free the slot"
        engine.gate.set()
        engine.tokenizing.clear()
        engine.events.clear()
        # The running tokenization ends on its own; the next request is served.
        deltas, finals = await h.collect(request_id="next")
        assert finals and h.servicer.slots_busy == 0
        assert "gone" not in engine.started


async def test_a_prompt_past_what_the_context_holds_is_refused_before_tokenizing():
    async with worker_harness(FakeEngine(max_model_len=64)) as h:
        limit = 64 * PROMPT_BYTES_PER_TOKEN
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _drain(h.generate(prompt="é" * (limit // 2 + 1)))
        err = from_rpc_error(info.value)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details["field"] == "prompt" and err.details["limit"] == str(limit) and err.details["unit"] == "bytes"
        assert f"at most {limit}" in err.message and "64 tokens" in err.suggestions[0]
        # Just under the bound passes on to the tokenizer (and the context check).
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _drain(h.generate(prompt="a " * (limit // 2)))
        assert from_rpc_error(info.value).details["field"] == "prompt"
        assert "prompt tokens leave no room" in from_rpc_error(info.value).message
        assert len(h.engine.encoded) == 1


@pytest.mark.parametrize(
    ("messages", "unit"),
    [
        ([("user", "x" * 1500), ("assistant", "y" * 1500)], "bytes"),
        ([("user", "hi")] * (CHAT_MESSAGES.limit + 1), "messages"),
    ],
)
async def test_a_conversation_past_its_bounds_is_refused_before_the_template(messages, unit):
    async with worker_harness(FakeEngine(max_model_len=64)) as h:
        chat = inference_pb2.ChatInput(messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _drain(h.generate(prompt=None, chat=chat))
        err = from_rpc_error(info.value)
        assert err.code == "INVALID_ARGUMENT" and err.details["field"] == "chat" and err.details["unit"] == unit
        assert h.engine.chats == []
