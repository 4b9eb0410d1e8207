"""GET /metrics of a real queen process after requests through its front
door: this machine as a local node, its hive started by the queen, the
model downloaded from the hub-like server and served by the stand-in worker
(the real contract without an engine). The first request is a cold start;
after N requests from the official `openai` client, with a key from
`rbee-keeper keys create`, the counters say N and the histograms have
observations. The queen runs with --metrics-public: the scrape needs no key."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.hive import free_port_block
from tests.fixtures.metrics import parse_metrics, sample
from tests.fixtures.queen import kill_node_hives
from tests.integration.test_app_keys import create
from tests.integration.test_queen_tasks import REF, cluster, local_node, node_env, until  # noqa: F401  (fixture)

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHAT = [{"role": "user", "content": "hi"}]


async def test_requests_through_the_front_door_are_counted(queen_factory, node_env, tmp_path: Path) -> None:  # noqa: F811
    http_port = free_port_block(1)
    queen = await queen_factory("--metrics-public", RBEE_QUEEN_HTTP_PORT=str(http_port), **node_env)
    home = tmp_path / "node"
    root = f"http://127.0.0.1:{http_port}"
    try:
        await local_node(queen, home)
        key = await create(queen, "prometheus")
        n = 4
        async with openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=120) as client:
            # The first is a cold start: download, spawn, load, then the answer.
            first = await client.chat.completions.create(model=REF, messages=CHAT, max_tokens=3)
            assert first.choices[0].message.content
            # The queen follows the hive it just started (its watcher retries with a backoff).
            assert await until(lambda: cluster(queen)), "the queen's registry never listed the worker"
            for i in range(1, n):
                if i % 2:
                    chunks = [c async for c in await client.chat.completions.create(model=REF, messages=CHAT, max_tokens=3, stream=True)]
                    assert chunks
                else:
                    await client.completions.create(model=REF, prompt="hi", max_tokens=3)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="made-up-model", messages=CHAT, max_tokens=3)
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.get(f"{root}/metrics")  # --metrics-public: no key needed
        assert resp.status_code == 200, resp.text
        found = parse_metrics(resp.text)
        assert sample(found, "rbee_requests_total", model=REF, node="here", status="200") == n
        assert sample(found, "rbee_time_to_first_token_seconds_count", model=REF) == n
        assert sample(found, "rbee_e2e_request_latency_seconds_count", model=REF) == n
        assert sample(found, "rbee_generation_tokens_total", model=REF) == 3 * n
        assert sample(found, "rbee_requests_total", model="unresolved", node="none", status="404") == 1
        assert sample(found, "rbee_cold_starts_total", model=REF, node="here", outcome="ready") == 1
        assert sample(found, "rbee_cold_start_duration_seconds_count", model=REF, node="here", outcome="ready") == 1
        assert sample(found, "rbee_cold_start_duration_seconds_sum", model=REF, node="here", outcome="ready") > 0
        assert sample(found, "rbee_node_up", node="here") == 1
        workers = [labels for name, labels in found if name == "rbee_worker_slots_total"]
        assert len(workers) == 1 and dict(workers[0])["node"] == "here" and dict(workers[0])["model"] == REF
        assert sample(found, "rbee_worker_slots_total", **dict(workers[0])) >= 1
        assert "made-up" not in resp.text
    finally:
        await queen.close()
        kill_node_hives(home)
