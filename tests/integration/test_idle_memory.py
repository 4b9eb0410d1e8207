"""Idle memory through the real thing (docs/queen.md, "Idle memory"): a
queen, a node whose hive the queen starts, workers of the stand-in program
(the real worker program and servicer on a fake engine, one token every
50 ms). The node's free memory is pinned with the hive's resource override
file, which the hive reads on every query, so the test makes the node full
once its workers run."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import pytest

from tests.fixtures.hive import write_overrides, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import KEEPER_BIN, QueenProc, kill_node_hives
from tests.integration.test_queen_placement import FILES, GiB, add_local, small_install, workers
from tests.integration.test_queen_tasks import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPOS = {name: f"rbee-test/idle-{name}" for name in ("idle", "busy", "new", "once")}
REFS = {name: f"hf:{repo}" for name, repo in REPOS.items()}


async def one_node(queen_factory, hub, tmp_path: Path, **env: str) -> tuple[QueenProc, Path, Path]:
    """A queen and node a (32 GiB free, pinned) running stand-in workers."""
    for repo in REPOS.values():
        hub.add_repo(repo, FILES)
    program = write_standin_program(tmp_path / "standin")
    queen = await queen_factory(**hive_env(
        hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s", STANDIN_LOAD_S="0.3",
        RBEE_HIVE_WORKER_ENV="STANDIN_*,FAKE_ENGINE_*", FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.05",
        # The node's pinned figures, not the queen's floor for a CPU node, decide here.
        RBEE_QUEEN_HIVE_MIN_RAM_CPU="0", **env,
    ))  # fmt: skip
    overrides = write_overrides(tmp_path / "a-resources.json", ram_total_bytes=64 * GiB, ram_available_bytes=32 * GiB)
    home = tmp_path / "home-a"
    await add_local(queen, "a", home, "--install-path", str(small_install(tmp_path / "install-a", overrides)))
    return queen, home, overrides


async def infer(queen: QueenProc, name: str, *extra: str) -> tuple[int, str, str]:
    return await queen.keeper("infer", "--model", REFS[name], "--node", "a", "--prompt", "hi", "--max-tokens", "3", *extra)


def by_model(listed: list[dict]) -> dict[str, dict]:
    return {w["model_ref"]: w for w in listed}


async def test_a_new_model_on_a_full_node_evicts_the_idle_worker_and_not_the_busy_one(queen_factory, hub, tmp_path: Path) -> None:
    home = tmp_path / "home-a"
    busy_client = None
    try:
        queen, home, overrides = await one_node(queen_factory, hub, tmp_path)
        code, out, err = await infer(queen, "idle")
        assert code == 0 and out.strip() == "t1 t2 t3", err

        # The second model's worker serves a long request (1500 tokens, 75 s) while the node fills up.
        busy_client = await asyncio.create_subprocess_exec(
            str(KEEPER_BIN), "infer", "--model", REFS["busy"], "--node", "a", "--prompt", "long", "--max-tokens", "1500",
            "--queen", queen.address, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=queen.keeper_env(),
        )  # fmt: skip

        async def serving() -> dict | None:
            busy = by_model(await workers(queen)).get(REFS["busy"])
            return busy if busy and busy["state"] == "busy" else None

        busy = await until(serving, timeout=120)
        assert busy, await workers(queen)
        idle = by_model(await workers(queen))[REFS["idle"]]
        assert idle["state"] == "idle"

        # The node holds the new model (the estimate reads its files) and is full:
        # 1 GiB free, where a worker of it needs 3 GiB by the estimate.
        for name in ("new", "once"):
            code, _, err = await queen.keeper("models", "download", REFS[name], "--node", "a")
            assert code == 0, err
        write_overrides(overrides, ram_total_bytes=64 * GiB, ram_available_bytes=GiB)
        code, out, err = await infer(queen, "new")
        assert code == 0 and out.strip() == "t1 t2 t3", err
        lines = [ln for ln in err.splitlines() if "Evicted idle worker" in ln]
        assert len(lines) == 1, err
        [line] = lines
        assert f"Evicted idle worker {idle['id']} (model {REFS['idle']}, idle " in line, line
        # The node's free memory is pinned: what was freed is the estimate's, and said so.
        assert f"on node a to make room for {REFS['new']}: 3.0 GiB freed by the estimate" in line, line

        after = by_model(await workers(queen))
        assert REFS["idle"] not in after and REFS["new"] in after
        assert after[REFS["busy"]]["id"] == busy["id"] and after[REFS["busy"]]["state"] == "busy"
        assert busy_client.returncode is None  # its answer still streams

        # Once answered, the new model's worker is the idle one: the next model evicts it, still not the busy one.
        code, out, err = await infer(queen, "once")
        assert code == 0 and out.strip() == "t1 t2 t3", err
        lines = [ln for ln in err.splitlines() if "Evicted idle worker" in ln]
        assert len(lines) == 1 and f"Evicted idle worker {after[REFS['new']]['id']} (model {REFS['new']}" in lines[0], err
        after = by_model(await workers(queen))
        assert set(after) == {REFS["busy"], REFS["once"]} and after[REFS["busy"]]["id"] == busy["id"]
        assert busy_client.returncode is None
    finally:
        if busy_client is not None and busy_client.returncode is None:
            busy_client.send_signal(signal.SIGINT)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(busy_client.communicate(), 30)
            if busy_client.returncode is None:
                busy_client.kill()
        kill_node_hives(home)


async def test_keep_alive_0_on_the_task_api_stops_the_worker_after_its_answer(queen_factory, hub, tmp_path: Path) -> None:
    home = tmp_path / "home-a"
    try:
        # The hive's own idle timeout is short: it stops the workers it spawned for itself, not the queen's.
        queen, home, _ = await one_node(queen_factory, hub, tmp_path, RBEE_HIVE_IDLE_TIMEOUT="1.5")
        code, out, err = await infer(queen, "once", "--keep-alive", "bogus")
        assert code == 1 and "INVALID_KEEP_ALIVE" in err and "--keep-alive 5m" in err, err

        # The default (5m) keeps a worker; a request with 0 stops it once answered.
        code, out, err = await infer(queen, "idle")
        assert code == 0, err
        code, _, err = await queen.keeper("models", "download", REFS["busy"], "--node", "a")
        assert code == 0, err
        code, _, err = await queen.keeper("workers", "spawn", "--node", "a", "--model", REFS["busy"])
        assert code == 0, err

        async def hive_stopped_its_own() -> bool:
            return REFS["busy"] not in by_model(await workers(queen))

        # Idle for longer than the hive's own worker, the queen's is still there.
        assert await until(hive_stopped_its_own, timeout=60), await workers(queen)
        assert REFS["idle"] in by_model(await workers(queen))
        code, out, err = await infer(queen, "once", "--keep-alive", "0")
        assert code == 0 and out.strip() == "t1 t2 t3", err
        [once] = [w for w in await workers(queen) if w["model_ref"] == REFS["once"]] or [None]

        async def gone() -> bool:
            return REFS["once"] not in by_model(await workers(queen))

        assert await until(gone, timeout=60), await workers(queen)
        assert REFS["idle"] in by_model(await workers(queen))
        log = (queen.home / "logs" / "queen.log").read_text()
        assert f"({REFS['once']}) on a ran out (keep-alive 0s, idle " in log, log[-3000:]
        if once is not None:
            assert f"Keep-alive of worker {once['id']}" in log
    finally:
        kill_node_hives(home)

