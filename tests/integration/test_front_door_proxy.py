"""The front door's proxy without vLLM: the queen's HTTP app (real uvicorn,
real router) in front of the real worker servicer on a FakeEngine, in
process or as the real worker program (tests/unit/worker/fake_worker_main.py).
What needs no real engine is tested here: busy → 429, a client that goes
away cancels on the worker, a worker killed mid-stream, keys and shapes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest

from rbee.narration import Narrator
from rbee.v1 import common_pb2, inference_pb2, registry_pb2
from rbee_queen.http.asgi import create_app
from rbee_queen.http.auth import Authenticator
from rbee_queen.http.routing import Router, _Cached
from rbee_queen.http.listener import HttpServer
from rbee_queen.http.upstream import WorkerLease
from rbee_queen.nodes.store import NodeStore
from rbee_queen.workers import ClusterWorkers
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import KEY, MD, worker_harness
from tests.unit.worker.test_program import KEY as PROGRAM_KEY, fake_worker

ADMIN = "front-door-admin-key"
MODEL = "hf:rbee-test/fake-model"
CHAT = [{"role": "user", "content": "hi"}]


class FrontDoor:
    def __init__(self, server: HttpServer, router: Router, app) -> None:
        self.server = server
        self.router = router
        self.app = app
        self.clients: list[openai.AsyncOpenAI] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    def client(self, key: str = ADMIN) -> openai.AsyncOpenAI:
        made = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)
        self.clients.append(made)
        return made


@asynccontextmanager
async def front_door(tmp_path: Path, address: str, key: str, slots: int, verifier=None) -> AsyncIterator[FrontDoor]:
    """The app over a registry that knows one worker (as a hive would report it)."""
    registry = ClusterWorkers(120)
    info = common_pb2.WorkerInfo(id="w-1", address=address, model_ref=MODEL, backend=common_pb2.BACKEND_CPU, state=common_pb2.WORKER_STATE_IDLE,
                                 slots_total=slots, slots_available=slots)  # fmt: skip
    registry.apply("here", "127.0.0.1:1", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", workers=[info]))
    store = NodeStore(tmp_path / "beehives.db")
    router = Router(store, registry, None, Narrator("queen-rbee", stream=open(os.devnull, "w")), cold_start_wait_s=1)
    router._access["w-1"] = _Cached(WorkerLease("here", "w-1", address, key, False, MODEL))
    app = create_app(Authenticator(ADMIN, verifier), router)
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    door = FrontDoor(server, router, app)
    try:
        yield door
    finally:
        for made in door.clients:
            await made.close()
        await server.stop()
        await router.close()
        store.close()


async def test_shapes_short_name_and_n(tmp_path: Path) -> None:
    async with worker_harness(FakeEngine(), slots=4) as h, front_door(tmp_path, h.address, KEY, 4) as door:
        c = door.client()
        reply = await c.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=5)
        assert reply.model == "fake-model" and reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 5
        two = await c.completions.create(model=MODEL, prompt="hello", max_tokens=3, n=2, temperature=1)
        assert [ch.index for ch in two.choices] == [0, 1] and all(ch.text for ch in two.choices)
        sent = h.engine.options
        assert len(sent) == 2
        streamed = [ch async for ch in await c.completions.create(model=MODEL, prompt="x", max_tokens=3, n=2, temperature=1, stream=True)]
        assert {ch.choices[0].index for ch in streamed} == {0, 1}
        models = (await c.models.list()).data
        assert [m.id for m in models] == [MODEL] and models[0].model_dump()["loaded_on"] == ["here"]


async def test_every_slot_busy_is_429_with_retry_after(tmp_path: Path) -> None:
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine, slots=1) as h, front_door(tmp_path, h.address, KEY, 1) as door:
        # Another client holds the worker's only slot (the registry still says it is free).
        holder = h.generate(max_tokens=50, request_id="holder")
        await engine.started["holder"].wait()
        try:
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as err:
                    await door.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=stream)
                assert err.value.response.headers["retry-after"] == "1"
                assert err.value.body["code"] == "all_slots_busy"
        finally:
            holder.cancel()


async def test_a_client_that_goes_away_cancels_on_the_worker(tmp_path: Path) -> None:
    engine = FakeEngine(mode="engine", delay=0.02, max_model_len=4096)
    async with worker_harness(engine, slots=2) as h, front_door(tmp_path, h.address, KEY, 2) as door:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2000, "stream": True}
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", f"{door.base_url}/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {ADMIN}"}) as resp:  # fmt: skip
                assert resp.status_code == 200
                seen = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                    if seen == 3:
                        break
        # The worker's engine is told to abort, once, well before the 2000 tokens.
        for _ in range(500):
            if engine.aborted_ids:
                break
            await asyncio.sleep(0.02)
        [rid] = engine.aborted_ids
        assert rid.startswith("chatcmpl-")
        steps = engine.steps[rid]
        await asyncio.sleep(0.3)
        assert engine.steps[rid] <= steps + 2 < 2000
        assert h.servicer.slots_busy == 0


async def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    async with fake_worker(tmp_path, "--slots", "2", "--model-ref", MODEL, FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.05") as worker:
        await worker.wait_loaded()
        async with front_door(tmp_path, worker.address, PROGRAM_KEY, 2) as door:
            stream = await door.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2000, stream=True)
            got = 0
            with pytest.raises(openai.APIError) as err:
                async for _chunk in stream:
                    got += 1
                    if got == 3:
                        os.killpg(worker.proc.pid, signal.SIGKILL)
            assert not isinstance(err.value, openai.APIConnectionError)
            assert got >= 3 and err.value.body["code"] in ("worker_unreachable", "stream_broken", "internal_error")


async def test_keys_and_scopes(tmp_path: Path) -> None:
    scopes = {"app-key": "inference", "other-key": "metrics"}
    async with worker_harness(FakeEngine(), slots=1) as h, front_door(tmp_path, h.address, KEY, 1, scopes.get) as door:
        assert (await door.client("app-key").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)).choices
        with pytest.raises(openai.PermissionDeniedError):
            await door.client("other-key").models.list()
        with pytest.raises(openai.AuthenticationError):
            await door.client("revoked").models.list()
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{door.server.port}/health")).status_code == 200
            resp = await http.post(f"{door.base_url}/chat/completions", content=b"{not json")
            assert resp.status_code == 401  # the key is checked before the body is read
            resp = await http.post(f"{door.base_url}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {ADMIN}"})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


async def test_an_unexpected_failure_is_a_500_naming_only_an_error_id(tmp_path: Path, caplog) -> None:
    async with worker_harness(FakeEngine(), slots=1) as h, front_door(tmp_path, h.address, KEY, 1) as door:
        async def broken(*_a, **_k):
            raise RuntimeError("secret detail /home/someone")

        door.router.models.resolve = broken
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{door.base_url}/chat/completions", json={"model": MODEL, "messages": CHAT},
                                   headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        assert resp.status_code == 500
        error = resp.json()["error"]
        assert "secret" not in json.dumps(error) and error["message"].startswith("Internal error (id ")


async def test_a_client_that_stops_waiting_for_a_whole_answer_cancels_on_the_worker(tmp_path: Path) -> None:
    engine = FakeEngine(mode="engine", delay=0.02, max_model_len=4096)
    async with worker_harness(engine, slots=2) as h, front_door(tmp_path, h.address, KEY, 2) as door:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2000}
        async with httpx.AsyncClient(timeout=1.0) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{door.base_url}/completions", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        for _ in range(500):
            if engine.aborted_ids:
                break
            await asyncio.sleep(0.02)
        [rid] = engine.aborted_ids
        assert rid.startswith("cmpl-") and engine.steps[rid] < 2000
        for _ in range(100):
            if h.servicer.slots_busy == 0:
                break
            await asyncio.sleep(0.02)
        assert h.servicer.slots_busy == 0
