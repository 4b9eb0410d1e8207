"""A real rbee-hive process supervising stand-in worker processes (the real
worker program and servicer on a fake engine, tests/unit/worker/fake_worker_main.py): health-check
removal, idle timeout, deaths, port races, load failures, OOM kills and the
SIGTERM cascade. The engine path is covered in test_hive_real_worker.py."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

from rbee.errors import RbeeError
from rbee.v1 import common_pb2
from tests.fixtures.hive import FollowFailed, HiveProc, free_port_block

pytestmark = pytest.mark.asyncio(loop_scope="session")

IDLE = common_pb2.WORKER_STATE_IDLE


async def spawn_loaded(hive: HiveProc, model: Path, **fields) -> common_pb2.WorkerInfo:
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0, **fields)
    assert reply.worker.state == common_pb2.WORKER_STATE_LOADING
    items = await hive.follow(reply.worker.id)
    assert items[-1].worker.state == IDLE
    return items[-1].worker


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_stalled_worker_is_removed_after_three_failed_health_checks(start_hive, standin_program, model):
    hive = await start_hive(
        worker_binary=standin_program,
        extra_env={"RBEE_HIVE_HEALTH_INTERVAL": "0.5", "RBEE_HIVE_HEALTH_TIMEOUT": "0.5", "STANDIN_CHILD": "1"},
    )
    worker = await spawn_loaded(hive, model)
    tree = [p.pid for p in psutil.Process(worker.pid).children(recursive=True)] + [worker.pid]
    os.kill(worker.pid, signal.SIGSTOP)  # still accepts connections (kernel), answers nothing
    await hive.wait_for_line(f"{worker.id} failed 3 health checks in a row")
    await hive.wait_for_line(f"{worker.id} terminated")
    assert await hive.list() == []
    text = hive.text()
    for n in (1, 2, 3):
        assert f"Health check of {worker.id} at {worker.address} failed ({n}/3)" in text
    assert all(gone(pid) for pid in tree), "the stopped worker's process tree must be gone"


async def test_idle_workers_are_shut_down_and_the_hive_stays_up(start_hive, standin_program, model):
    hive = await start_hive(worker_binary=standin_program, extra_env={"RBEE_HIVE_IDLE_TIMEOUT": "1.5"})
    worker = await spawn_loaded(hive, model)
    await hive.wait_for_line(f"{worker.id} has been idle for")
    await hive.wait_for_line(f"{worker.id} terminated (exited with code 0)")
    assert await hive.list() == []
    assert gone(worker.pid)
    # still serving: a new worker can be spawned
    again = await spawn_loaded(hive, model)
    assert again.id != worker.id


async def test_a_worker_that_dies_is_removed_and_the_event_logged(start_hive, standin_program, model):
    hive = await start_hive(worker_binary=standin_program)
    worker = await spawn_loaded(hive, model)
    os.kill(worker.pid, signal.SIGKILL)
    line = await hive.wait_for_line(f"{worker.id} died")
    assert "killed by SIGKILL" in line and "removed from the registry" in line
    assert await hive.list() == []


async def test_port_taken_between_probe_and_bind_is_retried_on_the_next_port(start_hive, standin_program, model):
    block = free_port_block(3)
    hive = await start_hive(
        worker_binary=standin_program,
        extra_env={
            "RBEE_HIVE_WORKER_PORT_START": str(block),
            "RBEE_HIVE_WORKER_PORT_END": str(block + 2),
            # Another process holds this port when the worker binds it: exit 3, PORT_IN_USE.
            "STANDIN_TAKEN_PORTS": str(block),
        },
    )
    worker = await spawn_loaded(hive, model)
    assert worker.address == f"127.0.0.1:{block + 1}"
    assert f"Port {block} was taken before {worker.id} could bind it (PORT_IN_USE), trying port {block + 1}" in hive.text()


async def test_a_failed_load_ends_the_follow_stream_with_the_log_lines(start_hive, standin_program, model):
    hive = await start_hive(worker_binary=standin_program, extra_env={"STANDIN_FAIL_LOAD": "1"})
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    with pytest.raises(FollowFailed) as exc:
        await hive.follow(reply.worker.id)
    err = exc.value.error
    assert err.code == "WORKER_STARTUP_FAILED"
    assert "crashed during startup" in err.message and "exited with code 1" in err.message
    assert "MODEL_LOAD_FAILED" in err.details["last_log_lines"]
    assert err.details["cause"].startswith("MODEL_LOAD_FAILED")
    assert err.details["log_path"] == reply.log_path
    assert any(i.narration.actor == "model-loader" for i in exc.value.items)  # the worker's own lines were relayed
    assert await hive.list() == []


async def test_sigterm_cascade_force_kills_a_worker_that_ignores_shutdown(start_hive, standin_program, model, tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()  # before the hive: a worker's sandbox keeps later entries beside the hive's home closed
    stubborn_model = tmp_path / "stubborn-model"
    stubborn_model.mkdir()
    (stubborn_model / "model.safetensors").write_bytes(b"\0" * 4096)
    hive = await start_hive(
        worker_binary=standin_program,
        extra_env={
            "RBEE_HIVE_SHUTDOWN_GRACE": "2",
            "STANDIN_CHILD": "1",
            "STANDIN_PID_DIR": str(pid_dir),
            # Acknowledges Shutdown, traps SIGTERM, stays.
            "STANDIN_IGNORE_SHUTDOWN_FOR": "stubborn",
        },
    )
    polite = await spawn_loaded(hive, model)
    stubborn = await spawn_loaded(hive, stubborn_model)
    pids = {int(p.read_text()) for p in pid_dir.glob("*.pid")}
    assert len(pids) == 4  # two workers, each with a child process
    hive.remember_tree()

    assert await hive.terminate() == 0
    text = hive.text()
    for phrase in (
        "SIGTERM received: shutting down",
        "Shutting down 2 worker(s)",
        "Waiting up to 2s for each worker to exit",
        f"{polite.id} terminated (exited with code 0)",
        f"{stubborn.id} did not exit within 2s; force-killing its process tree",
        f"{stubborn.id} terminated (killed by SIGKILL)",
        "All workers terminated (1 force-killed); registry cleared",
        "rbee-hive stopped",
    ):
        assert phrase in text, phrase
    assert "Shutdown requested; ignoring it" in (hive.home / "logs" / f"{stubborn.id}.log").read_text()
    assert [pid for pid in pids if not gone(pid)] == []
    assert hive.alive_known() == []


async def test_a_worker_killed_by_the_oom_killer_is_named_as_such(start_hive, standin_program, model):
    base = Path("/sys/fs/cgroup/memory")
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in line), None)
    if own is None or not os.access(base / own.lstrip("/"), os.W_OK):
        pytest.skip("no writable cgroup v1 memory controller here to cause a real OOM kill")
    cgroup = base / own.lstrip("/") / f"rbee-oom-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(64 * 1024 * 1024))
        hive = await start_hive(worker_binary=standin_program, extra_env={"STANDIN_OOM_CGROUP": str(cgroup)})
        # Killed while loading: the spawn's answer or the follow after it names the death.
        with pytest.raises((FollowFailed, RbeeError)) as exc:
            reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
            await hive.follow(reply.worker.id)
        err = exc.value.error if isinstance(exc.value, FollowFailed) else exc.value
        assert err.code == "WORKER_OOM_KILLED"
        assert "OOM killer" in err.message
        assert err.details["signal"] == "SIGKILL"
    finally:
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                await asyncio.sleep(0.1)
