"""GET /metrics of a real queen after requests to a real vLLM worker through
its front door (the shared cluster of tests/fixtures/cluster.py): N more
requests move the request counter by N, the latency histograms and token
counters by what the replies said; the worker and the node are there."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.fixtures.cluster import SLOTS, Cluster
from tests.fixtures.metrics import Samples, parse_metrics, sample

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine]

CHAT = [{"role": "user", "content": "Say hello to the bees."}]


async def scrape(cluster: Cluster) -> Samples:
    async with httpx.AsyncClient(timeout=60) as http:
        resp = await http.get(f"{cluster.root_url}/metrics", headers={"Authorization": f"Bearer {cluster.admin_key}"})
    assert resp.status_code == 200, resp.text
    return parse_metrics(resp.text)


async def test_n_requests_move_the_counters_by_n(cluster: Cluster) -> None:
    model = dict(model=cluster.model)
    before = await scrape(cluster)
    n, generated = 3, 0
    async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key=cluster.admin_key, max_retries=0, timeout=300) as c:
        for i in range(n):
            if i == 1:
                chunks = [ch async for ch in await c.chat.completions.create(
                    model=cluster.model, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                    stream_options={"include_usage": True})]  # fmt: skip
                generated += chunks[-1].usage.completion_tokens
            else:
                reply = await c.chat.completions.create(model=cluster.model, messages=CHAT, max_tokens=8, temperature=0)
                generated += reply.usage.completion_tokens
    after = await scrape(cluster)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("rbee_requests_total", **model, node=cluster.node, status="200") == n
    assert moved("rbee_time_to_first_token_seconds_count", **model) == n
    assert moved("rbee_e2e_request_latency_seconds_count", **model) == n
    assert moved("rbee_generation_tokens_total", **model) == generated
    assert moved("rbee_prompt_tokens_total", **model) > 0
    assert 0 < moved("rbee_inter_token_latency_seconds_count", **model) <= generated - n
    assert sample(after, "rbee_node_up", node=cluster.node) == 1
    totals = {dict(labels)["worker"]: v for (name, labels), v in after.items()
              if name == "rbee_worker_slots_total" and dict(labels)["model"] == cluster.model}  # fmt: skip
    assert SLOTS in totals.values(), totals
    assert sample(after, "rbee_requests_running", **model) == 0
