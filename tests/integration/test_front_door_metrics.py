"""GET /metrics and application keys through the front door without vLLM:
the queen's HTTP app (real uvicorn, real router, the metrics the queen
installs, keys from a real beehives.db) in front of the real worker servicer
on a FakeEngine. After N requests from the official `openai` client the
counters say N and the histograms have observations; a revoked key is
refused at once."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from rbee.narration import Narrator
from rbee.v1 import common_pb2, registry_pb2
from rbee_queen.appkeys import AppKeyStore
from rbee_queen.http.asgi import create_app
from rbee_queen.http.auth import Authenticator
from rbee_queen.http.routing import Router, _Cached
from rbee_queen.http.listener import HttpServer, install_metrics
from rbee_queen.http.upstream import WorkerLease
from rbee_queen.nodes.store import NodeRecord, NodeStore
from rbee_queen.workers import ClusterWorkers
from tests.fixtures.metrics import parse_metrics, sample
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import KEY, worker_harness

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN = "metrics-admin-key"
MODEL = "hf:rbee-test/fake-model"
CHAT = [{"role": "user", "content": "hi"}]
SLOTS = 4


@asynccontextmanager
async def front_door(tmp_path: Path, address: str, public: bool = False) -> AsyncIterator[SimpleNamespace]:
    """The queen's app as start_front_door builds it, over a registry that knows
    one worker of node "here" (as its hive would report it)."""
    registry = ClusterWorkers(120)
    info = common_pb2.WorkerInfo(id="w-1", address=address, model_ref=MODEL, backend=common_pb2.BACKEND_CPU, state=common_pb2.WORKER_STATE_IDLE,
                                 slots_total=SLOTS, slots_available=SLOTS)  # fmt: skip
    registry.apply("here", "127.0.0.1:1", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", workers=[info]))
    db = tmp_path / "beehives.db"
    store, keys = NodeStore(db), AppKeyStore(db)
    store.add(NodeRecord(name="here", transport="local", install_path="/opt/rbee", hive_key="hive-key"))
    store.add(NodeRecord(name="gone", transport="local", install_path="/opt/rbee", hive_key="hive-key-2"))
    router = Router(store, registry, None, Narrator("queen-rbee", stream=io.StringIO()), cold_start_wait_s=1)
    router._access["w-1"] = _Cached(WorkerLease("here", "w-1", address, KEY, False, MODEL))
    queen = SimpleNamespace(store=store, registry=registry, app_keys=keys)
    app = create_app(Authenticator(ADMIN, keys.verify), router, queen)
    install_metrics(app, router, queen, public)
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    clients: list[openai.AsyncOpenAI] = []

    def client(key: str) -> openai.AsyncOpenAI:
        made = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=60)
        clients.append(made)
        return made

    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.port}", keys=keys, client=client)
    finally:
        for made in clients:
            await made.close()
        await server.stop()
        await router.close()
        keys.close()
        store.close()


async def scrape(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.get(f"{url}/metrics", headers=headers)


async def test_after_n_requests_the_counters_say_n(tmp_path: Path) -> None:
    engine = FakeEngine(mode="slow", delay=0.005, max_model_len=4096)
    async with worker_harness(engine, slots=SLOTS) as h, front_door(tmp_path, h.address) as door:
        _, app_key = door.keys.create("grafana")
        c = door.client(app_key)
        generated = 0
        n = 6
        for i in range(n):
            if i % 2:
                chunks = [ch async for ch in await c.chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=6, stream=True, stream_options={"include_usage": True})]  # fmt: skip
                generated += chunks[-1].usage.completion_tokens
            else:
                reply = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6)
                generated += reply.usage.completion_tokens
        for made_up in ("no-such-model", "another-made-up-name"):
            with pytest.raises(openai.NotFoundError):
                await c.chat.completions.create(model=made_up, messages=CHAT, max_tokens=2)

        resp = await scrape(door.url, app_key)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        found = parse_metrics(resp.text)
        assert sample(found, "rbee_requests_total", model=MODEL, node="here", status="200") == n
        assert sample(found, "rbee_time_to_first_token_seconds_count", model=MODEL) == n
        assert sample(found, "rbee_e2e_request_latency_seconds_count", model=MODEL) == n
        assert sample(found, "rbee_e2e_request_latency_seconds_sum", model=MODEL) > 0
        itl = sample(found, "rbee_inter_token_latency_seconds_count", model=MODEL)
        assert 0 < itl <= generated - n
        assert sample(found, "rbee_generation_tokens_total", model=MODEL) == generated == n * 6
        assert sample(found, "rbee_prompt_tokens_total", model=MODEL) > 0
        # Made-up model names are counted, never labels.
        assert sample(found, "rbee_requests_total", model="unresolved", node="none", status="404") == 2
        assert "made-up" not in resp.text and "no-such-model" not in resp.text
        # The cluster at scrape time: the worker's slots and state, each node, nothing in flight.
        worker = dict(node="here", worker="w-1", model=MODEL)
        assert sample(found, "rbee_worker_slots_total", **worker) == SLOTS
        assert sample(found, "rbee_worker_state", **worker, state="idle") == 1
        assert sample(found, "rbee_node_up", node="here") == 1
        assert ("rbee_node_up", (("node", "gone"),)) in found and sample(found, "rbee_node_up", node="gone") == 0
        assert sample(found, "rbee_requests_running", model=MODEL) == 0
        assert all(name.startswith("rbee_") for name, _ in found)


async def test_metrics_need_a_key_unless_public_and_a_revoked_key_is_refused_at_once(tmp_path: Path) -> None:
    async with worker_harness(FakeEngine(), slots=SLOTS) as h, front_door(tmp_path / "a", h.address) as door:
        assert (await scrape(door.url, None)).status_code == 401
        assert (await scrape(door.url, "not-a-key")).status_code == 401
        assert (await scrape(door.url, ADMIN)).status_code == 200
        _, key = door.keys.create("webui")
        c = door.client(key)
        assert [m.id for m in (await c.models.list()).data] == [MODEL]
        assert (await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)).choices
        assert (await scrape(door.url, key)).status_code == 200
        # An inference key on an admin route of the HTTP API.
        with pytest.raises(openai.PermissionDeniedError):
            await c.post(f"{door.url}/api/web/workers/stop", body={"node": "here", "worker_id": "w-1"}, cast_to=object)
        assert door.keys.list()[0].last_used_unix > 0
        door.keys.revoke("webui")
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
        assert (await scrape(door.url, key)).status_code == 401
        # The queen's own key is untouched.
        assert (await door.client(ADMIN).models.list()).data
    async with worker_harness(FakeEngine(), slots=SLOTS) as h, front_door(tmp_path / "b", h.address, public=True) as door:
        resp = await scrape(door.url, None)
        assert resp.status_code == 200 and "rbee_worker_slots_total" in resp.text
