"""Fuzzing the worker (docs/security.md): its real servicer and gRPC server
with the fake engine (no vLLM), in-process on a loop of its own; every RPC of
InferenceService gets hostile messages and raw bytes with the right key. The
server keeps answering, health included; every reply is a success or a typed
rbee error. Shutdown goes last (it drains the worker for good)."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.narration import Narrator
from rbee.scopes import SERVICES
from tests.fuzz.conftest import examples
from tests.fuzz.test_fuzz_daemons import report
from tests.fuzz.wire import CLIENT_OPTIONS, Request, all_methods, call, edge_messages, message, raw_payload

METHODS = all_methods()
WORKER = sorted(m for m in METHODS if SERVICES.get(m.split("/")[1]) == "worker")
SHUTDOWN = "/rbee.v1.InferenceService/Shutdown"
SERVING = sorted(m for m in WORKER if m != SHUTDOWN)
KEY, ADMIN = "fuzz-worker-key", "fuzz-worker-admin"


class InProcessWorker:
    """The worker's server on an event loop in a thread (the fuzz tests are
    synchronous, as hypothesis needs)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-worker-loop", daemon=True)
        self.thread.start()
        self.shutdowns: list[float] = []
        self.ws = self.run(self._start())
        self.address = f"127.0.0.1:{self.ws.port}"

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self):
        from rbee_worker.grpc_server import create_server
        from rbee_worker.servicer import InferenceServicer
        from rbee_worker.status import Identity, WorkerStatus
        from tests.unit.worker.fakes import FakeEngine

        engine = FakeEngine()
        status = WorkerStatus()
        identity = Identity("w-fuzz", "fuzz-model", "/models/fuzz", "cpu", 0, "127.0.0.1", 0, os.getpid())
        servicer = InferenceServicer(
            engine, status, identity, 2, Narrator("llm-worker-rbee", stream=io.StringIO()), on_shutdown=self.shutdowns.append
        )
        ws = await create_server(servicer, status, KEY, admin_key=ADMIN)
        status.loaded(await engine.load(status.set_progress))
        return ws

    def close(self) -> None:
        self.run(self.ws.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def assert_serving(self, channel: grpc.Channel) -> None:
        assert self.thread.is_alive(), "the worker's loop died"
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


@pytest.fixture(scope="module")
def worker() -> Iterator[InProcessWorker]:
    w = InProcessWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def channel(worker) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(worker.address, options=CLIENT_OPTIONS) as ch:
        yield ch


def fuzz(worker: InProcessWorker, channel: grpc.Channel, seen: Counter, method: str, payload: bytes) -> None:
    key = ADMIN if method == SHUTDOWN else KEY
    outcome = call(channel, method, METHODS[method], payload, key, timeout=30)
    seen[(method.rsplit("/", 1)[1], outcome.rbee_code or outcome.code.name)] += 1
    worker.assert_serving(channel)


@st.composite
def worker_request(draw, methods: list[str], raw: bool = False):
    method = draw(st.sampled_from(methods))
    desc = METHODS[method].input_type
    if raw:
        return Request(method, draw(raw_payload(desc)))
    msg = draw(message(desc))
    if method.endswith("/Generate") and draw(st.booleans()):
        # Often a request the worker accepts but for its prompt and id, so the
        # stream itself is reached (a 10 MB prompt, NUL, a huge request id).
        from rbee.v1 import inference_pb2
        from tests.fuzz.wire import text

        msg = inference_pb2.GenerateRequest(
            prompt=draw(text()), request_id=draw(st.sampled_from(["", "r1", "r1", "\x00", "x" * 5000])),
            max_tokens=draw(st.integers(1, 8)), raw_prompt=draw(st.booleans()),
        )  # fmt: skip
    return Request(method, msg.SerializeToString())


def test_every_worker_rpc_survives_extreme_values(worker, channel):
    seen: Counter = Counter()
    for method in SERVING:
        for msg in edge_messages(METHODS[method].input_type):
            fuzz(worker, channel, seen, method, msg.SerializeToString())
    assert {m for m, _ in seen} == {m.rsplit("/", 1)[1] for m in SERVING}
    report(seen)


def test_the_worker_survives_hostile_messages(worker, channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(120))
    @given(request=worker_request(SERVING))
    def run(request):
        fuzz(worker, channel, seen, *request)

    run()
    report(seen)


@st.composite
def bounded_request(draw):
    """A Generate request with one bounded field at, just past or far past
    its bound (rbee/bounds.py), the rest ordinary; and what it should get."""
    from rbee.bounds import CHAT_MESSAGES, JSON_SCHEMA_DEPTH, LOGIT_BIAS, STOP, STOP_BYTES, STOP_TOKEN_IDS, prompt_bound
    from rbee.v1 import inference_pb2

    field = draw(st.sampled_from(["stop", "stop_bytes", "stop_token_ids", "logit_bias", "json_depth", "chat", "prompt"]))
    over = draw(st.sampled_from([0, 1, 2, 1000]))
    msg = inference_pb2.GenerateRequest(prompt="hello", max_tokens=2)
    if field == "stop":
        msg.stop.extend(["s"] * (STOP.limit + over))
    elif field == "stop_bytes":
        msg.stop.append("s" * (STOP_BYTES.limit + over))
    elif field == "stop_token_ids":
        msg.stop_token_ids.extend([7] * (STOP_TOKEN_IDS.limit + over))
    elif field == "logit_bias":
        msg.logit_bias.update({i: 1.0 for i in range(LOGIT_BIAS.limit + over)})
    elif field == "json_depth":
        depth = JSON_SCHEMA_DEPTH.limit + over
        msg.json_schema = '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)
    elif field == "chat":
        msg.chat.messages.extend([inference_pb2.ChatMessage(role="user", content="hi")] * (CHAT_MESSAGES.limit + over))
    else:
        # The fuzz worker's fake engine has a 64-token context.
        msg.prompt = "p" * (prompt_bound(64).limit + over)
    name = {"stop_bytes": "stop", "json_depth": "json_schema"}.get(field, field)
    return Request("/rbee.v1.InferenceService/Generate", msg.SerializeToString()), name, over > 0


def test_the_worker_holds_every_bound(worker, channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(40))
    @given(case=bounded_request())
    def run(case):
        (method, payload), field, past = case
        outcome = call(channel, method, METHODS[method], payload, KEY, timeout=30)
        seen[(field, outcome.rbee_code or outcome.code.name)] += 1
        if past:
            assert outcome.rbee_code == "INVALID_ARGUMENT" and f"Invalid {field}:" in outcome.message, outcome
            assert "at most" in outcome.message
        else:
            # At the bound the request gets past it (to the context check, or an answer).
            assert "at most" not in outcome.message, outcome
        worker.assert_serving(channel)

    run()
    report(seen)


def test_the_worker_survives_raw_bytes(worker, channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(50))
    @given(request=worker_request(WORKER, raw=True))
    def run(request):
        fuzz(worker, channel, seen, *request)

    run()


def test_the_worker_survives_hostile_shutdowns_last(worker, channel):
    seen: Counter = Counter()
    for msg in edge_messages(METHODS[SHUTDOWN].input_type):
        fuzz(worker, channel, seen, SHUTDOWN, msg.SerializeToString())
    # Draining now: the other RPCs still answer, typed.
    for method in SERVING:
        fuzz(worker, channel, seen, method, b"")
    report(seen)

