"""One inference through the queen (S1, S6.2, S8) with real processes: a
queen, this machine as a local node whose hive the queen starts, models
downloaded from the hub-like server, and the stand-in worker program (the real
worker program and servicer on a fake engine; tests/integration/test_queen_engine.py runs the
real engine). The hive inherits the queen's environment, which is how these
tests configure it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psutil
import pytest

from tests.fixtures.hive import STANDIN_MODULE, free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives, node_hive_pids

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "rbee-test/tiny"
REF = f"hf:{REPO}"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 3_000_000, "tokenizer.json": b"{}"}


@pytest.fixture
def node_env(tmp_path: Path, hub) -> dict[str, str]:
    hub.add_repo(REPO, FILES)
    program = write_standin_program(tmp_path / "standin")
    return hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s", STANDIN_LOAD_S="0.3")


async def local_node(queen: QueenProc, home: Path, name: str = "here", *extra: str) -> int:
    port = free_port_block(1)
    code, out, err = await queen.keeper("setup", "add-node", "--name", name, "--local", "--rbee-home", str(home), "--hive-port", str(port), *extra)
    assert code == 0, err
    return port


# The fake engine's answer to --max-tokens 3 (token k is "t{k} ", tests/unit/worker/fakes.py).
ANSWER = "t1 t2 t3 "


async def infer(queen: QueenProc, node: str = "here", *extra: str, queen_flag: bool = True) -> tuple[int, str, str]:
    return await queen.keeper("infer", "--node", node, "--model", REF, "--prompt", "hi", "--max-tokens", "3", *extra, queen=queen_flag)


async def cluster(queen: QueenProc, *args: str) -> list[dict]:
    code, out, err = await queen.keeper("workers", "list", "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def until(predicate, timeout: float = 30.0, step: float = 0.2):
    """Poll ``predicate`` (async) until it returns something truthy; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(step)


def worker_pids(home: Path) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any(STANDIN_MODULE in c for c in (p.info["cmdline"] or []))
            and any(str(home) in c for c in (p.info["cmdline"] or []))]  # fmt: skip


async def test_unregistered_node(queen: QueenProc) -> None:
    code, out, err = await infer(queen, "nowhere")
    assert code == 1 and out == ""
    assert "NODE_NOT_FOUND" in err and "rbee-keeper setup add-node --name nowhere" in err


async def test_cold_start_downloads_then_warm_start_reuses(queen_factory, node_env, hub, tmp_path: Path) -> None:
    queen = await queen_factory(**node_env)
    home = tmp_path / "node"
    try:
        await local_node(queen, home)
        code, out, err = await infer(queen)
        assert code == 0, err
        assert out == ANSWER + "\n"
        for line in ("Task: hf:rbee-test/tiny on here", "Starting rbee-hive on here", "Cold start: no worker serves",
                     "Hive version 0.1.0 is compatible", "[rbee-hive] 📚 Looking up hf:rbee-test/tiny", "⏬",
                     "Preflight passed for hf:rbee-test/tiny", "called back", "Cold start: worker"):  # fmt: skip
            assert line in err, err
        downloads = len(hub.body_requests())
        assert downloads >= 1
        [worker] = await until(lambda: cluster(queen))
        assert worker["node"] == "here" and worker["model_ref"] == REF and worker["capability"] == "cpu"

        code, out, err = await infer(queen)
        assert code == 0, err
        assert "Warm start: worker " + worker["id"] in err and "queen: " in err
        assert "Starting rbee-hive" not in err and "Cold start" not in err and "⏬" not in err
        assert len(hub.body_requests()) == downloads
        assert [w["id"] for w in await cluster(queen)] == [worker["id"]]
        # Persistent mode: the hive and its worker keep running after the command.
        assert node_hive_pids(home) and worker_pids(home)
        # The worker's key opens that worker only: the hive refuses it.
        assert (home / "hive.key").read_text().strip() not in err
    finally:
        kill_node_hives(home)


# A queen restarted after SIGKILL rebuilding its registry from the hives, and a
# silent hive's workers dropped after the stale setting and back after it
# answers: queen_workers.feature.


async def test_a_hive_restarted_under_a_running_queen(queen_factory, node_env, tmp_path: Path) -> None:
    queen = await queen_factory(**node_env)
    home = tmp_path / "node"
    try:
        await local_node(queen, home)
        code, out, err = await infer(queen)
        assert code == 0, err
        [old] = await until(lambda: cluster(queen))
        kill_node_hives(home)  # the hive dies with its process group
        for pid in worker_pids(home):
            psutil.Process(pid).kill()
        code, out, err = await infer(queen)
        assert code == 0, err
        assert "No hive answers" in err and "Starting rbee-hive on here" in err and "Cold start" in err
        fresh = await until(lambda: _other_than(queen, old["id"]), timeout=30)
        assert fresh
    finally:
        kill_node_hives(home)


async def _other_than(queen: QueenProc, worker_id: str) -> list[dict]:
    return [w for w in await cluster(queen) if w["id"] != worker_id]


# The ephemeral queen's cascade (nothing left running): queen_lifecycle.feature.


async def test_the_worker_key_opens_that_worker_only(queen_factory, node_env, tmp_path: Path) -> None:
    """S13: the keeper gets the worker's own key; it is refused by the hive and the queen."""
    import grpc

    from rbee.auth import auth_metadata
    from rbee.channel import open_channel
    from rbee.errors import from_rpc_error
    from rbee.v1 import inference_pb2, inference_pb2_grpc, nodes_pb2, nodes_pb2_grpc, registry_pb2, registry_pb2_grpc
    from rbee.v1 import tasks_pb2, tasks_pb2_grpc

    queen = await queen_factory(**node_env)
    home = tmp_path / "node"
    try:
        hive_port = await local_node(queen, home)
        queen_key = (queen.home / "queen.key").read_text().strip()
        channel = open_channel(queen.address)
        try:
            events = tasks_pb2_grpc.TaskServiceStub(channel).SubmitInference(
                tasks_pb2.SubmitInferenceRequest(node="here", model_ref=REF), metadata=auth_metadata(queen_key), timeout=120
            )
            assigned = [e.assigned async for e in events if e.HasField("assigned")][-1]
            worker_key = assigned.api_key
            assert worker_key and worker_key not in (queen_key, (home / "hive.key").read_text().strip())
            with pytest.raises(grpc.RpcError) as refused:
                await nodes_pb2_grpc.NodeServiceStub(channel).ListNodes(nodes_pb2.ListNodesRequest(), metadata=auth_metadata(worker_key))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await channel.close()
        hive = open_channel(f"127.0.0.1:{hive_port}")
        worker = open_channel(assigned.worker.address)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                await registry_pb2_grpc.HiveWorkerServiceStub(hive).ListWorkers(registry_pb2.ListWorkersRequest(), metadata=auth_metadata(worker_key))
            # The hive knows the key as that worker's inference key: the wrong scope.
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "WRONG_KEY_SCOPE" in str(from_rpc_error(refused.value).code)
            ready = await inference_pb2_grpc.InferenceServiceStub(worker).GetReadiness(
                inference_pb2.GetReadinessRequest(), metadata=auth_metadata(worker_key), timeout=30
            )
            assert ready.state
        finally:
            await hive.close()
            await worker.close()
    finally:
        kill_node_hives(home)


async def test_a_hung_hive_is_named_not_restarted(queen_factory, node_env, tmp_path: Path) -> None:
    """A hive that holds its port but does not answer (SIGSTOP): the queen says
    so instead of starting a second hive that could not bind."""
    queen = await queen_factory(**node_env)
    home = tmp_path / "node"
    try:
        await local_node(queen, home)
        code, out, err = await infer(queen)
        assert code == 0, err
        [hive_pid] = node_hive_pids(home)
        psutil.Process(hive_pid).suspend()
        try:
            code, out, err = await infer(queen)
        finally:
            psutil.Process(hive_pid).resume()
        assert code == 1
        assert "HIVE_UNREACHABLE" in err and "does not answer as a hive" in err and "SIGCONT" in err
        assert "Starting rbee-hive" not in err and node_hive_pids(home) == [hive_pid]
        code, out, err = await queen.keeper("workers", "list", "--capability", "gpu")
        assert code == 1 and "INVALID_ARGUMENT" in err and "--capability cpu" in err
    finally:
        kill_node_hives(home)
