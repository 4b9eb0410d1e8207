"""A burst through the front door splits evenly over two replicas
(docs/queen.md, "Placement" and "Replicas"): a real queen with its HTTP API,
two local nodes with their own homes, hive ports and catalogs, the model
deployed with `rbee-keeper models deploy --replicas 2` (one worker on each
node), each worker the stand-in (the real worker program and servicer on a
slow fake engine, so the burst's requests overlap). 16 chat completions sent
at once with the official `openai` client; each worker counts the requests
its engine took (STANDIN_COUNT_DIR, tests/unit/worker/fake_worker_main.py).

The router's contract (rbee_queen/http/routing.py): the worker with the most
free slots, counting the requests the queen has in flight or reserved on it,
ties to the one picked longest ago. Each worker has 8 slots (the CPU default)
and every request lasts a few fake tokens, so the 16 fill both workers'
slots: within 10 % of even is 8 and 8."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from tests.fixtures.hive import free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import kill_node_hives
from tests.integration.test_queen_placement import add_local
from tests.integration.test_queen_replicas import DEADLINE_S, FILES, QUEEN_ENV, REF, REPO, ready
from tests.integration.test_queen_tasks import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

BURST = 16
TOKENS = 4
TOKEN_DELAY_S = "0.25"  # each request about a second: the burst's requests overlap


async def test_a_burst_of_16_through_the_front_door_splits_evenly_over_two_replicas(queen_factory, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    program = write_standin_program(tmp_path / "standin")
    counts = tmp_path / "counts"
    counts.mkdir()
    http_port = free_port_block(1)
    env = hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s", STANDIN_LOAD_S="0.3",
                   RBEE_HIVE_WORKER_ENV="STANDIN_*,FAKE_ENGINE_*", STANDIN_COUNT_DIR=str(counts), FAKE_ENGINE_MODE="slow",
                   FAKE_ENGINE_DELAY=TOKEN_DELAY_S, RBEE_QUEEN_HTTP_PORT=str(http_port), **QUEEN_ENV)  # fmt: skip
    homes = {"a": tmp_path / "home-a", "b": tmp_path / "home-b"}
    try:
        queen = await queen_factory(**env)
        for name, home in homes.items():
            await add_local(queen, name, home)
        code, _, err = await queen.keeper("models", "deploy", REF, "--replicas", "2")
        assert code == 0, err
        workers = await until(lambda: ready(2, {"a", "b"})(queen), DEADLINE_S)
        assert workers, queen.text()[-4000:]
        assert all(w["slots_total"] == 8 for w in workers), workers

        key = (queen.home / "queen.key").read_text().strip()
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=key, max_retries=0, timeout=120) as client:

            async def ask() -> str:
                done = await client.chat.completions.create(model=REF, messages=[{"role": "user", "content": "hi"}], max_tokens=TOKENS)
                return done.choices[0].message.content

            answers = await asyncio.gather(*(ask() for _ in range(BURST)))
        assert all(a for a in answers), answers

        served = {w["id"]: len((counts / f"{w['id']}.requests").read_text().splitlines())
                  if (counts / f"{w['id']}.requests").exists() else 0 for w in workers}  # fmt: skip
        assert sum(served.values()) == BURST, (served, sorted(p.name for p in counts.glob("*")))
        even = BURST / len(workers)
        assert all(abs(n - even) <= 0.1 * even for n in served.values()), served
    finally:
        for home in homes.values():
            kill_node_hives(home)
