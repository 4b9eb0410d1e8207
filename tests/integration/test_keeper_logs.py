"""`rbee-keeper logs` against a real hive: history of the hive and its
workers, one worker's log, --follow until Ctrl+C."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from rbee.v1 import registry_pb2
from tests.fixtures.hive import HIVE_KEY, HiveProc

session_loop = pytest.mark.asyncio(loop_scope="session")


@session_loop
async def test_logs_history_and_follow(start_hive, standin_program, keeper, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "w").write_bytes(b"x")
    hive: HiveProc = await start_hive(worker_binary=standin_program)
    spawned = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    worker_id = spawned.worker.id
    await hive.follow(worker_id)
    env = {"RBEE_CONFIG": str(hive.home / "no-config.toml")}

    history = keeper("logs", "--hive", hive.address, "--api-key", HIVE_KEY, env=env)
    assert history.finish() == 0, history.describe()
    sources = {line.split(" | ", 1)[0] for line in history.stdout.splitlines()}
    assert "rbee-hive" in sources and worker_id in sources, history.describe()

    follow = keeper("logs", "--hive", hive.address, "--api-key", HIVE_KEY, "--worker", worker_id, "--follow", env=env)
    follow.wait_for(lambda k: f"{worker_id} | " in k.stdout, "the worker's history")
    assert all(line.startswith(f"{worker_id} | ") for line in follow.stdout.splitlines())
    before = len(follow.stdout)
    # New lines the worker writes while we follow arrive without asking again.
    await hive.call(hive.workers.ShutdownWorker, registry_pb2.ShutdownWorkerRequest(worker_id=worker_id))
    follow.wait_for(lambda k: len(k.stdout) > before, "lines written after following started")
    follow.send_signal(signal.SIGINT)
    assert follow.finish() == 130, follow.describe()
    assert "Traceback" not in follow.stderr


@session_loop
async def test_unknown_worker_log_names_the_id(start_hive, keeper) -> None:
    hive: HiveProc = await start_hive()
    env = {"RBEE_CONFIG": str(hive.home / "no-config.toml")}
    proc = keeper("logs", "--hive", hive.address, "--api-key", HIVE_KEY, "--worker", "worker-nope", env=env)
    assert proc.finish() == 1
    assert "NOT_FOUND" in proc.stderr and "worker-nope" in proc.stderr, proc.describe()
