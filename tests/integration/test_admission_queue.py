"""The admission queue through real processes (docs/queen.md, "Admission
queue"): a queen with its HTTP API, this machine as a local node whose hive
runs the stand-in worker (the real worker program on a slow fake engine) with
one slot. A request that finds the slot taken waits and is served when it
frees; a full queue is ALL_SLOTS_BUSY at once (the keeper, exit 1 without
retries) and 429 on the front door (openai.RateLimitError); a queued request
whose client leaves is dropped from the queue. Every wait is on an event the
queen shows (its metrics' queue depth, narration), never on a clock."""

from __future__ import annotations

import asyncio
import re
import signal

import httpx
import openai
import pytest
import pytest_asyncio

from tests.fixtures.hive import free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import KEEPER_BIN, QueenProc, kill_node_hives, start_queen
from tests.hubserver import HubServer
from tests.integration.test_queen_tasks import FILES, REF, REPO, local_node

pytestmark = pytest.mark.asyncio(loop_scope="session")

# A holder's answer takes minutes at this pace: it ends when the test closes it.
TOKEN_DELAY_S = "0.2"
HOLD_TOKENS = 1000
CHAT = [{"role": "user", "content": "hi"}]
WAIT_S = 60.0


class Cluster:
    def __init__(self, queen: QueenProc, http_port: int) -> None:
        self.queen = queen
        self.base = f"http://127.0.0.1:{http_port}"
        self.key = (queen.home / "queen.key").read_text().strip()
        self.http = httpx.AsyncClient(timeout=60)
        self.held: list = []

    async def depth(self) -> int:
        """rbee_queue_depth of the model in the queen's metrics (0 when absent)."""
        text = (await self.http.get(f"{self.base}/metrics")).text
        found = re.search(r'^rbee_queue_depth\{model="' + re.escape(REF) + r'"\} (\S+)$', text, re.M)
        return int(float(found.group(1))) if found else 0

    async def depth_becomes(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (now := await self.depth()) != n:
            assert loop.time() < deadline, f"queue depth stayed {now}, expected {n}"
            await asyncio.sleep(0.05)

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=self.key, max_retries=0, timeout=120)

    async def keeper(self, *extra: str) -> asyncio.subprocess.Process:
        """``infer`` through the queen, running in the background."""
        return await asyncio.create_subprocess_exec(
            str(KEEPER_BIN), "infer", "--node", "here", "--model", REF, "--prompt", "hi", "--max-tokens", "3", *extra,
            "--queen", self.queen.address, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=self.queen.keeper_env(),
        )  # fmt: skip

    async def hold(self) -> tuple[httpx.AsyncClient, httpx.Response]:
        """A streaming request that holds the worker's only slot until closed
        (its line iterator is kept: one dropped half-read closes the connection)."""
        client = httpx.AsyncClient(timeout=60)
        body = {"model": REF, "messages": CHAT, "max_tokens": HOLD_TOKENS, "stream": True}
        req = client.build_request("POST", f"{self.base}/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        resp = await client.send(req, stream=True)
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        while not (await lines.__anext__()).startswith("data: "):
            pass
        self.held.append(lines)
        return client, resp


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One cluster for the module: each test leaves the worker idle and the queue empty."""
    tmp = tmp_path_factory.mktemp("admission")
    with HubServer(tmp / "hub") as hub:
        hub.add_repo(REPO, FILES)
        program = write_standin_program(tmp / "standin")
        env = hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s", STANDIN_LOAD_S="0.3",
                       RBEE_HIVE_WORKER_ENV="STANDIN_*,FAKE_ENGINE_*", FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY=TOKEN_DELAY_S)  # fmt: skip
        http_port = free_port_block(1)
        queen = await start_queen(tmp / "q", **env, RBEE_QUEEN_HTTP_PORT=str(http_port), RBEE_QUEEN_METRICS_PUBLIC="1",
                                  RBEE_QUEEN_QUEUE_LENGTH="1", RBEE_QUEEN_QUEUE_WAIT="300s")  # fmt: skip
        home = tmp / "node"
        c = Cluster(queen, http_port)
        try:
            await local_node(queen, home)
            # The worker every request shares: one slot.
            code, out, err = await queen.keeper("infer", "--node", "here", "--model", REF, "--prompt", "hi", "--max-tokens", "3",
                                                "--slots", "1")  # fmt: skip
            assert code == 0, err
            yield c
        finally:
            await c.http.aclose()
            await queen.close()
            kill_node_hives(home)


async def test_the_task_api_queues_drops_a_leaver_and_refuses_a_full_queue(cluster: Cluster) -> None:
    holder, stream = await cluster.hold()
    try:
        # A keeper whose request waits, then leaves (killed): the queen drops it from the queue.
        leaver = await cluster.keeper()
        await cluster.depth_becomes(1)
        leaver.send_signal(signal.SIGKILL)
        await leaver.wait()
        await cluster.depth_becomes(0)

        waiter = await cluster.keeper()
        await cluster.depth_becomes(1)
        # The queue (length 1) is full: the next one is refused at once, and the keeper does not retry.
        refused = await cluster.keeper()
        out, err = await asyncio.wait_for(refused.communicate(), WAIT_S)
        text = err.decode()
        assert refused.returncode == 1 and out == b""
        assert "ALL_SLOTS_BUSY" in text and "--queue-length 1" in text and "retry" not in text.lower()
        assert not waiter.returncode
    finally:
        await stream.aclose()  # the holder leaves: its slot frees
        await holder.aclose()
    out, err = await asyncio.wait_for(waiter.communicate(), WAIT_S)
    text = err.decode()
    assert waiter.returncode == 0, text
    assert out.decode() == "t1 t2 t3 \n" or out.decode().startswith("t1 t2 t3")
    assert "queued, position 1 of 1" in text and "freed after" in text
    await cluster.depth_becomes(0)


async def test_the_front_door_queues_drops_a_leaver_and_answers_429_when_full(cluster: Cluster) -> None:
    client = cluster.openai()
    holder, stream = await cluster.hold()
    try:
        # A raw HTTP request waits, then its client goes away: dropped from the queue.
        leaving = httpx.AsyncClient(timeout=60)
        body = {"model": REF, "messages": CHAT, "max_tokens": 3}
        gone = asyncio.ensure_future(leaving.post(f"{cluster.base}/v1/chat/completions", json=body,
                                                  headers={"Authorization": f"Bearer {cluster.key}"}))  # fmt: skip
        await cluster.depth_becomes(1)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await leaving.aclose()
        await cluster.depth_becomes(0)

        waiting = asyncio.ensure_future(client.chat.completions.create(model=REF, messages=CHAT, max_tokens=3))
        await cluster.depth_becomes(1)
        for stream_flag in (False, True):
            with pytest.raises(openai.RateLimitError) as err:
                await client.chat.completions.create(model=REF, messages=CHAT, max_tokens=3, stream=stream_flag)
            assert err.value.response.headers.get("retry-after")
            assert err.value.body["code"] == "all_slots_busy" and "--queue-length 1" in err.value.body["message"]
        assert not waiting.done()
    finally:
        await stream.aclose()
        await holder.aclose()
    reply = await asyncio.wait_for(waiting, WAIT_S)
    assert reply.choices[0].message.content == "t1 t2 t3 " and reply.choices[0].finish_reason == "length"
    await cluster.depth_becomes(0)
    await client.close()
