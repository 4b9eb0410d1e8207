"""keep_alive=0 on the front door through the real engine (docs/openai-api.md,
"keep_alive"): the official openai client sends it in extra_body, the answer
comes whole, then the queen stops the worker: it leaves the registry and its
process exits. One real engine start (30-60 s here); it cannot share the
session cluster's worker, which this request would stop."""

from __future__ import annotations

import openai
import psutil
import pytest

from rbee.config import default_model_path
from tests.fixtures.cluster import LOADING_TIMEOUT_S, MODEL_REF, MODEL_REPO
from tests.fixtures.hive import free_port_block
from tests.fixtures.models import hive_env
from tests.fixtures.queen import kill_node_hives
from tests.integration.test_queen_placement import add_local, workers
from tests.integration.test_queen_tasks import until

pytestmark = pytest.mark.asyncio(loop_scope="session")


def worker_processes(home) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any("llm-worker-rbee" in c for c in cmd) and any(str(home) in c for c in cmd):
            found.append(proc)
    return found


async def test_keep_alive_0_stops_the_real_worker_once_the_answer_is_out(queen_factory, hub, tmp_path) -> None:
    model = default_model_path()
    if not (model / "config.json").is_file():
        pytest.fail(f"default model missing at {model}: run `make model` first (make test does)")
    hub.add_repo(MODEL_REPO, {f.name: f for f in model.iterdir() if f.is_file()})
    port = free_port_block(1)
    home = tmp_path / "node"
    try:
        queen = await queen_factory(**hive_env(hub, RBEE_QUEEN_HTTP_PORT=str(port),
                                               RBEE_QUEEN_HTTP_COLD_START_WAIT=f"{LOADING_TIMEOUT_S}s"))  # fmt: skip
        await add_local(queen, "here", home)
        key = (queen.home / "queen.key").read_text().strip()
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=LOADING_TIMEOUT_S + 60)
        messages = [{"role": "user", "content": "Say hello."}]

        # A keep_alive that is no duration: 400 naming it, before any worker starts.
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL_REF, messages=messages, max_tokens=2, extra_body={"keep_alive": "soon"})
        assert info.value.param == "keep_alive" and "duration" in info.value.message
        assert await workers(queen) == []

        reply = await client.chat.completions.create(model=MODEL_REF, messages=messages, max_tokens=4, temperature=0,
                                                     extra_body={"keep_alive": 0})  # fmt: skip
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        assert reply.choices[0].finish_reason in ("length", "stop")

        async def gone() -> bool:
            return await workers(queen) == [] and not worker_processes(home)

        assert await until(gone, timeout=120), (await workers(queen), worker_processes(home))
        log = (queen.home / "logs" / "queen.log").read_text()
        assert f"({MODEL_REF}) on here ran out (keep-alive 0s, idle " in log, log[-3000:]
        assert "on here stopped: its memory is free" in log
    finally:
        kill_node_hives(home)
        for proc in worker_processes(home):
            proc.kill()
