"""Crash safety (docs/security.md): a hive killed with SIGKILL mid-download,
mid-provision and mid-spawn, then restarted on the same RBEE_HOME: every
catalog passes `PRAGMA integrity_check`, nothing half-done is registered,
the retry completes, and no worker of the dead hive is left holding memory
(its workers get SIGTERM when it dies; the next hive stops any that ignored
it). And 8 processes writing each catalog at once: no "database is locked"."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rbee.v1 import common_pb2, provisioning_pb2, provisioning_pb2_grpc
from tests.fixtures.common import REPO
from tests.fixtures.hive import HiveProc, start_hive_process
from tests.fixtures.models import HOLD_ENV, HiveModels, hive_env
from tests.hubserver import HubServer, make_blob

ASYNC = pytest.mark.asyncio(loop_scope="session")

WRITERS = 8
OPS = 25
CATALOGS = ("models.db", "workers.db")


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def assert_catalogs_sound(home: Path, names: tuple[str, ...] = CATALOGS) -> None:
    for name in names:
        assert integrity(home / name) == "ok", name


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """Those of ``pids`` still alive (zombies count as gone) after ``seconds``."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + seconds
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def kill9(hive: HiveProc) -> None:
    hive.remember_tree()
    os.kill(hive.proc.pid, signal.SIGKILL)


async def restart(hive: HiveProc, **kwargs) -> HiveProc:
    await hive.proc.wait()
    if hive.channel is not None:
        await hive.channel.close()
        hive.channel = None
    return await start_hive_process(hive.home, **kwargs)


# --- mid-download --------------------------------------------------------------


@ASYNC
async def test_a_hive_killed_mid_download_restarts_clean_and_the_retry_completes(tmp_path):
    blob = make_blob(3_000_000, seed=5)
    with HubServer(tmp_path / "hub") as hub:
        hub.add_repo("acme/crash", {"model.safetensors": blob, "config.json": b"{}"})
        hold = hub.hold_at("acme/crash", "model.safetensors", 1_000_000)
        env = hive_env(hub, **HOLD_ENV)
        hive = await start_hive_process(tmp_path / "home", extra_env=env)
        try:
            download = asyncio.ensure_future(HiveModels(hive).download("hf:acme/crash"))
            assert await asyncio.to_thread(hold.reached.wait, 60), "the download never reached the hold"
            kill9(hive)
            await download  # the stream breaks with the hive
            hold.release.set()
            assert_catalogs_sound(hive.home)
            hive = await restart(hive, extra_env=env)
            models = HiveModels(hive)
            assert await models.list() == [], "a half-downloaded model was registered"
            done = await models.download("hf:acme/crash")
            assert done.error is None, done.narration
            assert Path(done.record.local_path, "model.safetensors").read_bytes() == blob
            assert [m.model_ref for m in await models.list()] == ["hf:acme/crash"]
            assert_catalogs_sound(hive.home)
        finally:
            hold.release.set()
            await hive.close()


# --- mid-spawn ------------------------------------------------------------------


async def spawn_loading(hive: HiveProc, model: Path) -> common_pb2.WorkerInfo:
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    assert reply.worker.state == common_pb2.WORKER_STATE_LOADING
    return reply.worker


@ASYNC
async def test_the_workers_of_a_hive_killed_mid_spawn_are_gone_within_60_s(tmp_path, standin_program, model):
    """Decided: gone, not re-adopted. The registry and the workers' keys die
    with the hive; its workers get SIGTERM from the kernel (PDEATHSIG) and
    stop, engine and all."""
    hive = await start_hive_process(tmp_path / "home", worker_binary=standin_program,
                                    extra_env={"STANDIN_LOAD_S": "20", "STANDIN_CHILD": "1"})  # fmt: skip
    try:
        worker = await spawn_loading(hive, model)
        tree = [worker.pid, *(p.pid for p in psutil.Process(worker.pid).children(recursive=True))]
        assert len(tree) == 2, "the stand-in's child (its engine's process) is running"
        kill9(hive)
        started = time.monotonic()
        left = await asyncio.to_thread(gone_within, tree, 60)
        assert left == [], f"still running {time.monotonic() - started:.0f} s after the hive died: {left}"
        assert_catalogs_sound(hive.home)
        hive = await restart(hive, worker_binary=standin_program, extra_env={"STANDIN_LOAD_S": "0.1"})
        assert await hive.list() == []
        again = await spawn_loading(hive, model)
        items = await hive.follow(again.id)
        assert items[-1].worker.state == common_pb2.WORKER_STATE_IDLE, "the retry completes"
    finally:
        await hive.close()


@ASYNC
async def test_the_worker_program_stops_when_its_hive_is_killed(tmp_path, standin_program, model):
    """llm-worker-rbee's own code (flags, signals, narration, shutdown) on a
    fake engine. Its SIGTERM handler narrates first, to the dead hive's pipe:
    that must not stop the shutdown (it did: BrokenPipeError, and the worker
    stayed). With vLLM's engine: test_hive_real_worker.py's cascade."""
    hive = await start_hive_process(tmp_path / "home", worker_binary=standin_program)
    try:
        worker = await spawn_loading(hive, model)
        items = await hive.follow(worker.id)
        assert items[-1].worker.state == common_pb2.WORKER_STATE_IDLE
        kill9(hive)
        assert await asyncio.to_thread(gone_within, [worker.pid], 45) == [], "the worker outlived its hive"
    finally:
        await hive.close()


PARENT = """
import os, subprocess, sys
worker = subprocess.Popen(
    [sys.executable, "-m", "rbee_hive.workers.launch", sys.executable, "-m", "tests.unit.worker.fake_worker_main",
     "--model", sys.argv[1], "--port", "0", "--backend", "cpu"],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    env=dict(os.environ, RBEE_WORKER_API_KEY="k", PYTHONUNBUFFERED="1"),
)
print(worker.pid, flush=True)
for line in worker.stdout:
    if b"Ready" in line:
        print("ready", flush=True)
        break
sys.stdin.read()  # until killed
"""


def test_a_worker_whose_parent_died_shuts_down_although_its_output_pipe_is_broken(tmp_path, model):
    """The worker's SIGTERM handler narrates to the dead parent's pipe first;
    BrokenPipeError there used to abort the handler, and the worker ran on."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              cwd=str(REPO))  # fmt: skip
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == b"ready"
        parent.kill()
        parent.wait(10)
        assert gone_within([worker_pid], 30) == [], "the worker ran on after its parent died"
    finally:
        parent.kill()
        try:
            os.killpg(worker_pid, signal.SIGKILL)
        except (OSError, UnboundLocalError):
            pass


@ASYNC
async def test_a_worker_that_ignores_sigterm_is_stopped_by_the_next_hive(tmp_path, standin_program, model):
    hive = await start_hive_process(tmp_path / "home", worker_binary=standin_program,
                                    extra_env={"STANDIN_LOAD_S": "0.1", "STANDIN_IGNORE_SHUTDOWN": "1"})  # fmt: skip
    try:
        worker = await spawn_loading(hive, model)
        await hive.follow(worker.id)
        kill9(hive)
        assert await asyncio.to_thread(gone_within, [worker.pid], 3) == [worker.pid], "it traps SIGTERM"
        hive = await restart(hive, worker_binary=standin_program)
        assert await asyncio.to_thread(gone_within, [worker.pid], 10) == []
        assert f"Stopped {worker.id} (pid {worker.pid}), left running by a hive that did not stop cleanly" in hive.text()
        assert await hive.list() == []
    finally:
        await hive.close()


# --- mid-provision --------------------------------------------------------------


async def provision(hive: HiveProc) -> tuple[provisioning_pb2.WorkerEnvironment | None, list[str], Exception | None]:
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
    env, lines = None, []
    try:
        async for msg in stub.ProvisionWorker(provisioning_pb2.ProvisionWorkerRequest(backend=common_pb2.BACKEND_CPU), metadata=hive.md, timeout=900):
            if msg.HasField("environment"):
                env = msg.environment
            elif msg.event.HasField("narration"):
                lines.append(msg.event.narration.message)
    except Exception as exc:  # noqa: BLE001 - the hive may die under the stream
        return env, lines, exc
    return env, lines, None


def pip_processes(env_dir: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "pip" in cmd and str(env_dir) in cmd:
            found.append(proc.pid)
    return found


@ASYNC
async def test_a_hive_killed_mid_provision_registers_nothing_and_the_retry_completes(tmp_path):
    hive = await start_hive_process(tmp_path / "home")
    env_dir = hive.home / "workers" / "llm-worker-rbee-cpu"
    try:
        task = asyncio.ensure_future(provision(hive))
        line = await hive.wait_for_line("Installing rbee from", timeout=300)
        assert str(env_dir) in line
        await asyncio.sleep(1.0)  # pip is under way
        installing = pip_processes(env_dir)
        assert installing, "pip runs for the install"
        kill9(hive)
        env, _lines, error = await task
        assert env is None and error is not None
        assert await asyncio.to_thread(gone_within, installing, 30) == [], "pip dies with its hive"
        assert_catalogs_sound(hive.home)
        hive = await restart(hive)
        stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
        listed = await hive.call(stub.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest())
        assert list(listed.environments) == [], "a half-built environment was registered"
        env, lines, error = await provision(hive)
        assert error is None and env is not None, lines
        assert env.path == str(env_dir)
        assert_catalogs_sound(hive.home)
    finally:
        await hive.close()


# --- concurrent writers ------------------------------------------------------------


def _write_models(path: str, n: int) -> str:
    from rbee_hive.catalog.models import ModelCatalog, ModelRecord

    catalog = ModelCatalog(Path(path))
    try:
        for i in range(OPS):
            ref = f"org/m{n}-{i}"
            catalog.add(ModelRecord("hf", ref, f"/models/{n}/{i}", 1000 + i, "safetensors", {"n": n}))
            catalog.update_metadata("hf", ref, touched=i)
            catalog.list()
            if i % 2:
                catalog.remove("hf", ref)
            catalog.add(ModelRecord("hf", "org/shared", f"/models/shared/{n}", i, "safetensors"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    finally:
        catalog.close()


def _write_workers(path: str, n: int) -> str:
    from rbee_hive.catalog.workers import WorkerCatalog, WorkerEnvRecord

    catalog = WorkerCatalog(Path(path))
    try:
        for i in range(OPS):
            record = WorkerEnvRecord(id=f"env-{n}-{i % 5}", worker_type="llm-worker-rbee", backend="cpu",
                                     path=f"/w/{n}/{i}", version="0.1.0", engine="vllm-cpu", source="/src",
                                     features=["cpu"], details={"i": str(i)})  # fmt: skip
            catalog.put(record)
            catalog.list("cpu")
            if i % 3 == 0:
                catalog.remove(record.id)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    finally:
        catalog.close()


def _write_nodes(path: str, n: int) -> str:
    from rbee_queen.nodes.store import NodeRecord, NodeStore

    store = NodeStore(Path(path))
    try:
        for i in range(OPS):
            name = f"node-{n}-{i}"
            store.add(NodeRecord(name=name, transport="local", install_path="/opt/rbee", hive_key=f"k{n}{i}"))
            store.mark_reachable(name)
            store.list()
            if i % 2:
                store.remove(name)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    finally:
        store.close()


KEPT = OPS - OPS // 2  # rows each writer leaves (it removes every other one)


@pytest.mark.parametrize(("name", "writer", "table", "extra"), [
    ("models.db", _write_models, "models", 1),  # plus the row every writer rewrites
    ("workers.db", _write_workers, None, 0),
    ("beehives.db", _write_nodes, "nodes", 0),
])  # fmt: skip
def test_eight_processes_write_one_catalog_at_once_without_database_is_locked(tmp_path, name, writer, table, extra):
    path = tmp_path / name
    assert writer(str(path), -1) == "ok"  # created (and migrated) first, as a daemon would
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(WRITERS) as pool:
        results = pool.starmap(writer, [(str(path), n) for n in range(WRITERS)])
    assert results == ["ok"] * WRITERS, [r for r in results if r != "ok"]
    assert integrity(path) == "ok"
    if table is not None:
        with sqlite3.connect(path) as db:
            count = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
        assert count == (WRITERS + 1) * KEPT + extra
