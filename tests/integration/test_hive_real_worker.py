"""A real rbee-hive spawning the real llm-worker-rbee on the default model,
started from `rbee-keeper workers spawn` (one engine start for the module):
port fallback, spawn → loading → idle with the callback, listing, health,
logs, tokens streamed from the worker, a startup crash on a folder without
weights, and the SIGTERM cascade leaving no process behind."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.narration import stage_of
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc, preflight_pb2, registry_pb2
from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.hive import HIVE_KEY, FollowFailed, HiveProc, start_hive_process

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine]

MODEL_REF = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"
S = common_pb2.WorkerState


@dataclass
class Keeper:
    code: int
    stdout: str
    stderr: str


async def keeper(*args: str, home: Path, timeout: float = 600) -> Keeper:
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env=proc_env(RBEE_HOME=str(home), RBEE_CONFIG=str(home / "no-config.toml")),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Keeper(proc.returncode, out.decode(), err.decode())


@dataclass
class Spawned:
    hive: HiveProc
    keeper: Keeper
    worker: common_pb2.WorkerInfo
    occupied_port: int
    engine_pids: set[int]
    worker_key: str = ""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def spawned(tmp_path_factory: pytest.TempPathFactory, default_model: Path):
    home = tmp_path_factory.mktemp("hive-real")
    hive = await start_hive_process(home, worker_binary=VENV_BIN / "llm-worker-rbee")
    # Something else listens on the first worker port: the hive must move on.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", hive.worker_ports[0]))
    blocker.listen()
    try:
        result = await keeper(
            "workers", "spawn", "--hive", hive.address, "--api-key", HIVE_KEY,
            "--model", str(default_model), "--model-ref", MODEL_REF, "--backend", "cpu", "--device", "0",
            home=home,
        )  # fmt: skip
        assert result.code == 0, result.stderr
        worker_id, address, worker_key = result.stdout.split()
        assert worker_key != HIVE_KEY
        workers = await hive.list()
        assert [w.id for w in workers] == [worker_id]
        hive.remember_tree()
        engine = {p.pid for p in psutil.Process(workers[0].pid).children(recursive=True)}
        yield Spawned(hive, result, workers[0], hive.worker_ports[0], engine | {workers[0].pid}, worker_key)
    finally:
        blocker.close()
        await hive.close()


async def test_spawn_moves_past_a_taken_port_and_narrates_it(spawned: Spawned):
    assert spawned.worker.address == f"127.0.0.1:{spawned.occupied_port + 1}"
    line = f"Port {spawned.occupied_port} is in use, trying port {spawned.occupied_port + 1}"
    assert line in spawned.keeper.stderr
    assert line in spawned.hive.text()


async def test_spawn_goes_loading_then_idle_through_the_callback(spawned: Spawned):
    items = await spawned.hive.follow(spawned.worker.id)  # replays the spawn's story
    kinds = [i.WhichOneof("kind") for i in items]
    messages = [i.narration.message for i in items if i.HasField("narration")]
    actors = {i.narration.actor for i in items if i.HasField("narration")}
    assert any("Preflight passed" in m for m in messages)
    assert any("called back" in m and "state loading" in m for m in messages)
    assert {"rbee-hive", "llm-worker-rbee", "model-loader"} <= actors  # the worker's stdout was relayed
    stages = [stage_of(i.progress) for i in items if i.HasField("progress")]
    assert "weights" in stages and stages[-1] == "ready"
    assert kinds[-1] == "worker" and items[-1].worker.state == S.WORKER_STATE_IDLE
    assert items[-1].worker.slots_total > 0
    # keeper followed the same stream
    assert "is ready on" in spawned.keeper.stderr and "is idle on" in spawned.keeper.stderr


async def test_list_filters_by_model_and_state(spawned: Spawned):
    hive = spawned.hive
    assert [w.id for w in await hive.list(model_ref=MODEL_REF)] == [spawned.worker.id]
    assert await hive.list(model_ref="hf:other/model") == []
    assert [w.id for w in await hive.list(state=S.WORKER_STATE_IDLE)] == [spawned.worker.id]
    assert await hive.list(state=S.WORKER_STATE_LOADING) == []
    w = (await hive.list())[0]
    assert (w.model_ref, w.backend, w.device, w.model_path) == (MODEL_REF, common_pb2.BACKEND_CPU, 0, spawned.worker.model_path)


async def test_tokens_stream_from_the_spawned_worker(spawned: Spawned):
    channel = open_channel(spawned.worker.address)
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        text, final = [], None
        async for msg in stub.Generate(
            inference_pb2.GenerateRequest(prompt="Name a colour.", max_tokens=6, temperature=0),
            metadata=auth_metadata(spawned.worker_key),
            timeout=120,
        ):
            if msg.HasField("delta"):
                text.append(msg.delta.text)
            else:
                final = msg.final
    finally:
        await channel.close()
    assert final is not None and final.tokens_generated == 6 and "".join(text).strip()


async def test_keeper_lists_and_health_checks_the_workers(spawned: Spawned):
    hive = spawned.hive
    listed = await keeper("workers", "list", "--hive", hive.address, "--api-key", HIVE_KEY, "--json", home=hive.home)
    assert listed.code == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert rows[0]["id"] == spawned.worker.id and rows[0]["state"] in ("idle", "busy")
    health = await keeper("workers", "health", "--hive", hive.address, "--api-key", HIVE_KEY, home=hive.home)
    assert health.code == 0, health.stderr
    assert f"✅ {spawned.worker.id} {spawned.worker.address}" in health.stdout and "health=SERVING" in health.stdout
    wrong = await keeper("workers", "list", "--hive", hive.address, "--api-key", "wrong", home=hive.home)
    assert wrong.code == 1 and "INVALID_API_KEY" in wrong.stderr and hive.address in wrong.stderr


async def test_worker_log_is_a_file_under_rbee_home_and_streams(spawned: Spawned):
    hive = spawned.hive
    log_file = hive.home / "logs" / f"{spawned.worker.id}.log"
    assert "[model-loader]" in log_file.read_text()
    call = hive.workers.StreamLogs(
        registry_pb2.StreamLogsRequest(worker_id=spawned.worker.id, tail_lines=500), metadata=hive.md, timeout=30
    )
    lines = [m async for m in call]
    assert lines and all(m.source == spawned.worker.id for m in lines)
    assert any("[llm-worker-rbee]" in m.line for m in lines)


async def test_real_figures_of_this_machine(spawned: Spawned, default_model: Path):
    hive = spawned.hive
    res = await hive.call(hive.preflight.GetResources, preflight_pb2.GetResourcesRequest())
    assert res.ram_total_bytes == psutil.virtual_memory().total and not res.overridden
    assert res.disk_total_bytes == psutil.disk_usage(res.disk_path).total
    backends = await hive.call(hive.preflight.GetBackends, preflight_pb2.GetBackendsRequest())
    assert {b.name: b.available for b in backends.backends}[common_pb2.BACKEND_CPU]
    size = sum(p.stat().st_size for p in default_model.rglob("*") if p.is_file())
    ok = await hive.call(
        hive.preflight.CheckWorkerResources,
        preflight_pb2.CheckWorkerResourcesRequest(model_path=str(default_model), backend=common_pb2.BACKEND_CPU),
    )
    ram = next(c for c in ok.checks if c.resource == preflight_pb2.ResourceCheck.RESOURCE_RAM)
    assert ok.model_size_bytes == size
    assert ram.required_bytes == math.ceil(size * 1.2)
    assert ram.available_bytes > ram.required_bytes


async def test_a_folder_without_weights_is_a_startup_failure_with_the_log(spawned: Spawned, tmp_path: Path):
    bad = tmp_path / "no-weights"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    hive = spawned.hive
    try:
        reply = await hive.spawn(model_path=str(bad), backend="cpu", device=0)
        with pytest.raises(FollowFailed) as exc:
            await hive.follow(reply.worker.id)
        err = exc.value.error
    except FollowFailed:
        raise
    except Exception as failure:  # died before its server was up: the spawn itself fails
        err = failure
    assert getattr(err, "code", None) == "WORKER_STARTUP_FAILED", err
    assert "Worker startup failed" in err.message
    assert err.details["last_log_lines"].strip()
    assert err.details["log_path"].startswith(str(hive.home / "logs"))
    assert [w.id for w in await hive.list()] == [spawned.worker.id]  # the good worker is untouched


async def test_sigterm_stops_the_real_worker_and_its_engine(spawned: Spawned):
    """Last in the module: the hive's SIGTERM cascade on the real worker."""
    hive = spawned.hive
    hive.remember_tree()
    assert await hive.terminate() == 0
    text = hive.text()
    assert f"{spawned.worker.id} terminated (exited with code 0)" in text
    assert "registry cleared" in text
    left = [pid for pid in spawned.engine_pids | hive.known_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert left == []
