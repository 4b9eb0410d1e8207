"""The headline path with the real engine (one engine start): `rbee-keeper
infer --node --model hf:…` through a queen; the node's hive downloads the
model from the hub-like server, provisions the worker environment, spawns a
real llm-worker-rbee; then a warm start, a busy worker (refused at once by a
queen without an admission queue), and the worker killed mid-stream."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.channel import open_channel

from tests.fixtures.models import hive_env
from tests.fixtures.queen import KEEPER_BIN, kill_node_hives
from tests.integration.test_queen_tasks import cluster, local_node, until

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine]

REPO = "rbee-test/SmolLM2-135M-Instruct"
REF = f"hf:{REPO}"
PROMPT = "Name three flowers that honey bees like."


async def test_cold_warm_busy_and_a_worker_killed_mid_stream(queen_factory, hub, default_model: Path, tmp_path: Path) -> None:
    hub.add_repo(REPO, {f.name: f for f in default_model.iterdir() if f.is_file()})
    # No admission queue (length 0): a busy worker is ALL_SLOTS_BUSY at once
    # (the queue itself is tested in tests/integration/test_admission_queue.py).
    queen = await queen_factory(**hive_env(hub), RBEE_QUEEN_QUEUE_LENGTH="0")
    home = tmp_path / "node"
    holder = None
    try:
        # Mutual TLS on every link (queen → hive, hive ⇄ worker, keeper → worker),
        # asked for here since this node is on loopback.
        await local_node(queen, home, "here", "--tls")
        args = ("infer", "--node", "here", "--model", REF, "--prompt", PROMPT, "--temperature", "0")
        code, cold_out, err = await queen.keeper(*args, "--max-tokens", "8", "--slots", "1", timeout=900)
        assert code == 0, err
        assert cold_out.strip() and cold_out.endswith("\n")
        assert "⏬" in err and "Cold start: worker" in err and "Model loaded" in err
        worker_id = re.search(r"Cold start: worker (worker-\w+)", err).group(1)
        downloads = len(hub.body_requests())

        code, warm_out, err = await queen.keeper(*args, "--max-tokens", "8")
        assert code == 0, err
        assert f"Warm start: worker {worker_id}" in err and "⏬" not in err
        assert warm_out == cold_out  # greedy: the same answer from the same worker
        assert len(hub.body_requests()) == downloads
        [listed] = await cluster(queen)
        assert listed["id"] == worker_id and listed["slots_total"] == 1 and listed["tls"] is True
        assert "(mutual TLS)" in (home / "logs" / "hive.log").read_text()
        async with open_channel(listed["address"]) as channel:  # clear text is refused
            with pytest.raises(grpc.RpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        # One long stream holds the only slot.
        holder = await asyncio.create_subprocess_exec(
            str(KEEPER_BIN), *args, "--max-tokens", "1900", "--ignore-eos", "--queen", queen.address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=queen.keeper_env(),
        )  # fmt: skip
        first = await asyncio.wait_for(holder.stdout.read(1), 120)
        assert first
        busy = await until(lambda: _busy(queen), timeout=30)
        assert busy
        code, out, err = await queen.keeper(*args, "--max-tokens", "4")
        assert code == 1 and out == ""
        # The queen's refusal is final: the keeper does not retry it.
        assert "ALL_SLOTS_BUSY" in err and "--queue-length 0" in err and "retry" not in err.lower()

        # The worker dies mid-stream: the holder says so, keeps what arrived, exits 1.
        psutil.Process(listed["pid"]).kill()
        rest, holder_err = await asyncio.wait_for(holder.communicate(), 120)
        assert holder.returncode == 1
        text = holder_err.decode()
        assert "STREAM_BROKEN" in text or "closed unexpectedly" in text
        assert re.search(r"tokens generated: \d+ / 1900", text) and "partial" in text
        gone = await until(lambda: _gone(queen, worker_id), timeout=60)
        assert gone
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        kill_node_hives(home)
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(home) in part for part in proc.info["cmdline"] or []):
                proc.kill()


async def _busy(queen) -> bool:
    workers = await cluster(queen)
    return bool(workers) and workers[0]["slots_available"] == 0


async def _gone(queen, worker_id: str) -> bool:
    return all(w["id"] != worker_id for w in await cluster(queen))
