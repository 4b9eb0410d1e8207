"""Deployments through the real thing (docs/queen.md, "Replicas"): one queen,
two local nodes with their own homes, hive ports and catalogs, their hives
started by the queen, workers of the stand-in program (the real worker
program and servicer on a fake engine). What is observed is what a user
sees: `workers list`, `models list --deployed`, the queen's log; every wait
is a poll with a generous deadline, never a timed assertion."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.fixtures.hive import write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives, node_hive_pids
from tests.integration.test_queen_placement import add_local
from tests.integration.test_queen_tasks import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "rbee-test/replicated"
REF = f"hf:{REPO}"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 3_000_000, "tokenizer.json": b"{}"}
DEADLINE_S = 90.0
# Short windows so the test does not wait out production figures.
QUEEN_ENV = {"RBEE_QUEEN_WORKER_STALE_AFTER": "4s", "RBEE_QUEEN_REPLICA_INTERVAL": "0.5s",
             "RBEE_QUEEN_REPLICA_BACKOFF_BASE": "0.5s", "RBEE_QUEEN_REPLICA_BACKOFF_MAX": "2s",
             "RBEE_QUEEN_HIVE_START_TIMEOUT": "10s"}  # fmt: skip


async def replicas(queen: QueenProc) -> list[dict]:
    """The live workers of the model, as `workers list` shows them."""
    code, out, err = await queen.keeper("workers", "list", "--json")
    if code != 0:
        return []
    found = [json.loads(line) for line in out.splitlines()]
    return [w for w in found if w["model_ref"] == REF and w["state"] in ("loading", "idle", "busy")]


async def deployed(queen: QueenProc) -> list[dict]:
    code, out, err = await queen.keeper("models", "list", "--deployed", "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def ready(n: int, nodes: set[str] | None = None):
    async def probe(queen: QueenProc) -> list[dict] | None:
        found = await replicas(queen)
        ok = len(found) == n and all(w["state"] in ("idle", "busy") for w in found)
        return found if ok and (nodes is None or {w["node"] for w in found} == nodes) else None

    return probe


async def test_deploy_keeps_two_replicas_through_a_queen_restart_a_lost_node_and_a_removed_one(queen_factory, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    program = write_standin_program(tmp_path / "standin")
    env = hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s", STANDIN_LOAD_S="0.3", **QUEEN_ENV)
    homes = {"a": tmp_path / "home-a", "b": tmp_path / "home-b"}
    stopped_hive: int | None = None
    try:
        queen = await queen_factory(**env)
        for name, home in homes.items():
            await add_local(queen, name, home)

        # Deploy 2: one worker on each node (spread where both fit).
        code, out, err = await queen.keeper("models", "deploy", REF, "--replicas", "2", "--json")
        assert code == 0, err
        wish = json.loads(out)
        assert wish["replicas"] == 2 and wish["nodes"] == [] and not wish["replaced"]
        first = await until(lambda: ready(2, {"a", "b"})(queen), DEADLINE_S)
        assert first, queen.text()[-4000:]
        [d] = await deployed(queen)
        assert d["model_ref"] == REF and d["replicas"] == 2 and d["current_state"] == "complete" and sorted(d["workers"]) == sorted(
            f"{w['node']}/{w['id']}" for w in first)
        code, out, err = await queen.keeper("status", "--json")
        assert code == 0, err
        [shown] = json.loads(out)["deployments"]
        assert (shown["model_ref"], shown["ready"], shown["replicas"]) == (REF, 2, 2)
        log = queen.text()
        assert "📌 Deployed hf:rbee-test/replicated: 2 replica(s) on any node (cpu)" in log
        assert "Replica 1/2 of hf:rbee-test/replicated: Placed on " in log and "none of its replicas there yet" in log

        # (A worker killed with SIGKILL and replaced: features/queen_replicas.feature.)

        # Restart the queen: the wish holds, and the replicas run again (the
        # queen stops the hives it started, and with them their workers).
        assert await queen.terminate() == 0
        queen = await queen_factory(**env)
        [d] = await deployed(queen)
        assert (d["model_ref"], d["replicas"], d["created_at_unix_ms"]) == (REF, 2, wish["created_at_unix_ms"])
        code, out, err = await queen.keeper("models", "list", "--deployed")
        assert code == 0 and out.splitlines()[0].split()[:3] == ["DEPLOYED", "MODEL", "READY"] and REF in out, (out, err)
        again = await until(lambda: ready(2, {"a", "b"})(queen), DEADLINE_S)
        assert again, queen.text()[-4000:]
        assert "📌 Keeping 1 deployment(s): hf:rbee-test/replicated ×2" in queen.text()

        # b's hive stops answering (SIGSTOP) and stays so: once the registry
        # drops b's workers (its stale window) the replica is placed on a.
        [stopped_hive] = node_hive_pids(homes["b"])
        os.kill(stopped_hive, signal.SIGSTOP)
        moved = await until(lambda: ready(2, {"a"})(queen), DEADLINE_S)
        assert moved, queen.text()[-4000:]
        log = queen.text()
        assert "No word from the hive of b" in log and "b: unreachable" in log

        # b comes back with its old worker: one replica too many, an idle one stops.
        os.kill(stopped_hive, signal.SIGCONT)
        stopped_hive = None
        # Two are ready at once (a's): wait for the registry to hear b again,
        # the queen to see three, and the extra to stop.
        scaled_down = f"{REF}: 3 replicas run, 2 wanted: stopping "

        async def stopped_an_extra() -> bool:
            return scaled_down in queen.text()

        assert await until(stopped_an_extra, DEADLINE_S), queen.text()[-4000:]
        settled = await until(lambda: ready(2)(queen), DEADLINE_S)
        assert settled, queen.text()[-4000:]

        # Node b removed (the queen stops the hive it started there): its replica goes to a.
        code, _, err = await queen.keeper("setup", "remove-node", "--name", "b")
        assert code == 0, err
        assert await until(lambda: ready(2, {"a"})(queen), DEADLINE_S), queen.text()[-4000:]

        # Undeploy: the wish is gone and its workers stop.
        code, out, err = await queen.keeper("models", "undeploy", REF, "--json")
        assert code == 0, err
        assert len(json.loads(out)["stopped"]) == 2
        assert await until(lambda: _none(queen), DEADLINE_S), queen.text()[-4000:]
        assert await deployed(queen) == []
        code, out, err = await queen.keeper("models", "undeploy", REF)
        assert code == 1 and "DEPLOYMENT_NOT_FOUND" in err and "rbee-keeper models list --deployed" in err
    finally:
        if stopped_hive is not None:
            os.kill(stopped_hive, signal.SIGCONT)
        for home in homes.values():
            kill_node_hives(home)


async def _none(queen: QueenProc) -> bool:
    return not await replicas(queen)


async def test_deploy_refuses_bad_input_with_stable_codes(queen: QueenProc) -> None:
    code, _, err = await queen.keeper("models", "deploy", REF, "--replicas", "65")
    assert code == 1 and "INVALID_ARGUMENT" in err and "--replicas 1 to 64" in err
    code, _, err = await queen.keeper("models", "deploy", REF, "--nodes", "nowhere")
    assert code == 1 and "NODE_NOT_FOUND" in err and "rbee-keeper setup list-nodes" in err
    code, _, err = await queen.keeper("models", "deploy", "hf:bad", "--replicas", "1")
    assert code == 1 and "INVALID_MODEL_REF" in err
    code, _, err = await queen.keeper("models", "undeploy", REF, "--api-key", "wrong")
    assert code == 1 and "INVALID_API_KEY" in err
    code, _, err = await queen.keeper("models", "list", "--deployed", "--node", "a")
    assert code == 1 and "USAGE_ERROR" in err and "rbee-keeper models list --deployed" in err
    assert await deployed(queen) == []
