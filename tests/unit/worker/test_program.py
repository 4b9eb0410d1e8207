"""llm-worker-rbee as a process: flags, exit codes, signals, the hive callback.

The console script itself is run for what happens before any engine is
involved (CUDA check, port in use, bad flags, --version). The lifecycle tests
run the same program with a FakeEngine (tests/unit/worker/fake_worker_main.py)
so that signals, draining and the callback are exercised in a real process
without paying for vLLM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from rbee.auth import ScopedKeyInterceptor, auth_metadata, static_ring
from rbee.errors import from_rpc_error, from_status_bytes
from rbee.narration import stage_of
from rbee.scopes import Scope
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.fixtures.common import REPO, STARTING_DAEMON_OPTIONS, VENV_BIN, proc_env
from tests.fixtures.ports import free_port

WORKER = str(VENV_BIN / "llm-worker-rbee")
KEY = "process-test-key-7f3a"
CALLBACK_KEY = "hive-callback-key-91c2"
WS = common_pb2


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [WORKER, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=proc_env(**(env or {})),
        stdin=subprocess.DEVNULL,
    )


# -- before any engine ----------------------------------------------------------


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="this machine has an NVIDIA driver")
def test_cuda_backend_fails_fast_on_a_machine_without_gpu(tmp_path):
    port = free_port()
    result = run_worker(
        "--model", str(tmp_path), "--backend", "cuda", "--device", "0", "--port", str(port),
        env={"RBEE_WORKER_API_KEY": KEY},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "CUDA backend not available" in out
    for checked in ("NVML", "driver", "torch.cuda"):
        assert checked in out
    # Failed before the server or the engine: nothing was started.
    assert "Listening" not in out and "Loading model" not in out
    assert KEY not in out


def test_port_in_use_exits_3(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_worker("--model", str(tmp_path), "--port", str(port), env={"RBEE_WORKER_API_KEY": KEY})
    out = result.stdout + result.stderr
    assert result.returncode == 3, out
    assert f"[llm-worker-rbee] ❌ PORT_IN_USE: port {port} is in use" in out
    assert "Loading model" not in out


def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_worker("--model", str(missing), "--port", str(free_port()), env={"RBEE_WORKER_API_KEY": KEY})
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert "MODEL_NOT_FOUND" in out and str(missing) in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "7999"], "--model"),
        (["--model", "{tmp}"], "--port"),
        (["--model", "{tmp}", "--port", "7999", "--slots", "0"], "--slots"),
        (["--model", "{tmp}", "--port", "7999", "--slots", "257"], "--slots: must be between 1 and 256 (got 257)"),
        (["--model", "{tmp}", "--port", "7999", "--slots", "70000"], "--slots: must be between 1 and 256"),
        (["--model", "{tmp}", "--port", "7999", "--backend", "metal"], "metal"),
        (["--model", "{tmp}", "--port", "7999", "--device", "2"], "INVALID_DEVICE"),
        (["--model", "{tmp}", "--port", "abc"], "--port"),
    ],
)
def test_bad_flags_exit_1_with_a_message(tmp_path, capsys, args, needle):
    from rbee_worker.program import main

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBEE_WORKER_API_KEY", KEY)
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
    out = capsys.readouterr()
    assert code == 1
    assert needle in out.out + out.err
    assert "Traceback" not in out.out + out.err


def test_api_key_is_required(tmp_path, capsys):
    from rbee_worker.program import main

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RBEE_WORKER_API_KEY", raising=False)
        assert main(["--model", str(tmp_path), "--port", "7999"]) == 1
    out = capsys.readouterr().out
    assert "RBEE_WORKER_API_KEY" in out


def test_version_is_fast_and_does_not_import_the_engine():
    result = run_worker("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("llm-worker-rbee 0.1.0 (vllm ")
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; from rbee_worker.program import main; main(['--version']); "
         "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert probe.stdout.strip().splitlines()[-1] == "[]"


# -- the program with a fake engine -------------------------------------------------


class FakeHive(registry_pb2_grpc.WorkerCallbackServiceServicer):
    def __init__(self) -> None:
        self.reports: asyncio.Queue[registry_pb2.ReportWorkerRequest] = asyncio.Queue()
        self.seen: list[registry_pb2.ReportWorkerRequest] = []

    async def ReportWorker(self, request, context):
        self.seen.append(request)
        self.reports.put_nowait(request)
        return registry_pb2.ReportWorkerResponse()

    async def until(self, state: int) -> registry_pb2.ReportWorkerRequest:
        while True:
            report = await asyncio.wait_for(self.reports.get(), 60)
            if report.worker.state == state:
                return report


@asynccontextmanager
async def fake_hive() -> AsyncIterator[tuple[FakeHive, str]]:
    server = grpc.aio.server(interceptors=[ScopedKeyInterceptor(static_ring((Scope.CALLBACK, CALLBACK_KEY)))])
    hive = FakeHive()
    registry_pb2_grpc.add_WorkerCallbackServiceServicer_to_server(hive, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield hive, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


class FakeWorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.address = f"127.0.0.1:{port}"

    def text(self) -> str:
        return self.log.read_text()

    async def wait_loaded(self) -> None:
        async with grpc.aio.insecure_channel(self.address, options=STARTING_DAEMON_OPTIONS) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stream = stub.StreamLoadingProgress(
                inference_pb2.StreamLoadingProgressRequest(), metadata=auth_metadata(KEY), timeout=60, wait_for_ready=True
            )
            states = [m.state async for m in stream]
        assert states[-1] == WS.WORKER_STATE_IDLE, self.text()


@asynccontextmanager
async def fake_worker(tmp_path: Path, *flags: str, **fake_env: str) -> AsyncIterator[FakeWorkerProcess]:
    port = free_port()
    log = tmp_path / f"fake-worker-{port}.log"
    env = proc_env(RBEE_WORKER_API_KEY=KEY, RBEE_CALLBACK_API_KEY=CALLBACK_KEY, **fake_env)
    with open(log, "w") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.unit.worker.fake_worker_main",
            "--model", str(tmp_path), "--port", str(port), *flags,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=REPO, start_new_session=True,
        )
    worker = FakeWorkerProcess(proc, port, log)
    try:
        yield worker
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_in_flight_request_then_exits_0(tmp_path, sig):
    async with fake_hive() as (hive, hive_address):
        async with fake_worker(
            tmp_path, "--callback", hive_address, "--worker-id", "w-sig", "--model-ref", "hf:org/tiny", "--slots", "2",
            FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.02",
        ) as worker:
            loading = await hive.until(WS.WORKER_STATE_LOADING)
            info = loading.worker
            assert (info.id, info.model_ref, info.backend, info.device) == ("w-sig", "hf:org/tiny", common_pb2.BACKEND_CPU, 0)
            assert info.address == worker.address
            assert info.pid == worker.proc.pid
            assert (info.slots_total, info.slots_available) == (2, 2)
            assert info.model_path == str(tmp_path.resolve())
            await hive.until(WS.WORKER_STATE_IDLE)

            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                md = auth_metadata(KEY)
                call = stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=40), metadata=md)
                first = await call.read()
                assert first.delta.index == 0
                worker.proc.send_signal(sig)
                await hive.until(WS.WORKER_STATE_DRAINING)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in stub.Generate(inference_pb2.GenerateRequest(prompt="late", max_tokens=2), metadata=md):
                        pass
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                rest = []
                while (msg := await call.read()) is not grpc.aio.EOF:
                    rest.append(msg)
            assert rest[-1].final.reason == inference_pb2.FINISH_REASON_LENGTH
            assert rest[-1].final.tokens_generated == 40
            assert await asyncio.wait_for(worker.proc.wait(), 60) == 0
            await hive.until(WS.WORKER_STATE_STOPPED)
            log = worker.text()
            assert f"{signal.Signals(sig).name} received" in log
            assert "[llm-worker-rbee] 🌅 Starting worker w-sig" in log
            assert KEY not in log and CALLBACK_KEY not in log


async def test_sigterm_while_loading_exits_0(tmp_path):
    async with fake_hive() as (hive, hive_address):
        async with fake_worker(tmp_path, "--callback", hive_address, FAKE_ENGINE_HOLD_LOAD="1") as worker:
            await hive.until(WS.WORKER_STATE_LOADING)
            async with grpc.aio.insecure_channel(worker.address) as channel:
                ready = await inference_pb2_grpc.InferenceServiceStub(channel).GetReadiness(
                    inference_pb2.GetReadinessRequest(), metadata=auth_metadata(KEY)
                )
            assert ready.state == WS.WORKER_STATE_LOADING
            assert stage_of(ready.progress) == "weights"
            worker.proc.send_signal(signal.SIGTERM)
            await hive.until(WS.WORKER_STATE_DRAINING)
            assert await asyncio.wait_for(worker.proc.wait(), 60) == 0
            assert "Shutdown during loading" in worker.text()


async def test_shutdown_rpc_exits_0(tmp_path):
    async with fake_worker(tmp_path) as worker:
        await worker.wait_loaded()
        async with grpc.aio.insecure_channel(worker.address) as channel:
            reply = await inference_pb2_grpc.InferenceServiceStub(channel).Shutdown(
                inference_pb2.ShutdownRequest(drain_timeout_ms=1000), metadata=auth_metadata(KEY)
            )
        assert reply.state == WS.WORKER_STATE_DRAINING
        assert await asyncio.wait_for(worker.proc.wait(), 60) == 0
        assert "Worker" in worker.text() and "stopped (exit 0)" in worker.text()


async def test_load_failure_is_reported_then_exit_1(tmp_path):
    async with fake_hive() as (hive, hive_address):
        async with fake_worker(
            tmp_path, "--callback", hive_address, FAKE_ENGINE_LOAD_ERROR="config.json is not valid JSON"
        ) as worker:
            failed = from_status_bytes((await hive.until(WS.WORKER_STATE_FAILED)).error_status)
            assert failed.code == "MODEL_LOAD_FAILED"
            assert "config.json is not valid JSON" in failed.message
            assert await asyncio.wait_for(worker.proc.wait(), 60) == 1
            assert hive.seen[0].worker.state == WS.WORKER_STATE_LOADING
            assert "❌ MODEL_LOAD_FAILED" in worker.text()


async def test_engine_death_after_loading_fails_the_worker(tmp_path):
    async with fake_hive() as (hive, hive_address):
        async with fake_worker(
            tmp_path, "--callback", hive_address, "--engine-check-interval", "0.1", FAKE_ENGINE_DIE_AFTER="1"
        ) as worker:
            await hive.until(WS.WORKER_STATE_IDLE)
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                msgs = [m async for m in stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=2), metadata=auth_metadata(KEY))]
                assert msgs[-1].final.tokens_generated == 2
            failed = from_status_bytes((await hive.until(WS.WORKER_STATE_FAILED)).error_status)
            assert "fake engine process died" in failed.message
            assert await asyncio.wait_for(worker.proc.wait(), 60) == 1
            assert "fake engine process died" in worker.text()


async def test_engine_oom_kill_reaches_the_hive_and_later_requests_with_its_code(tmp_path):
    # The engine says its process was OOM-killed (VllmEngine's watch; here the
    # fake): the hive hears FAILED with the code at once, not at the next
    # health check (an hour away here), and so do later requests.
    async with fake_hive() as (hive, hive_address):
        async with fake_worker(
            tmp_path, "--callback", hive_address, "--engine-check-interval", "3600",
            FAKE_ENGINE_DIE_AFTER="1", FAKE_ENGINE_DEATH="ENGINE_OOM_KILLED",
        ) as worker:  # fmt: skip
            await hive.until(WS.WORKER_STATE_IDLE)
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                md = auth_metadata(KEY)
                msgs = [m async for m in stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=2), metadata=md)]
                assert msgs[-1].final.tokens_generated == 2
                failed = from_status_bytes((await hive.until(WS.WORKER_STATE_FAILED)).error_status)
                assert failed.code == "ENGINE_OOM_KILLED"
                assert failed.details["pid"] == "4242" and failed.suggestions
                with pytest.raises(grpc.aio.AioRpcError) as later:
                    await stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=2), metadata=md).read()
                assert from_rpc_error(later.value).code == "ENGINE_OOM_KILLED"
            assert "💀 ENGINE_OOM_KILLED: fake engine process ENGINE_OOM_KILLED" in worker.text()


async def test_unreachable_hive_is_narrated_once_and_not_fatal(tmp_path):
    nobody = free_port()
    async with fake_worker(tmp_path, "--callback", f"127.0.0.1:{nobody}") as worker:
        await worker.wait_loaded()
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            md = auth_metadata(KEY)
            finals = [m async for m in stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=3), metadata=md)]
            assert finals[-1].final.tokens_generated == 3
            await stub.Shutdown(inference_pb2.ShutdownRequest(drain_timeout_ms=1000), metadata=md)
        assert await asyncio.wait_for(worker.proc.wait(), 120) == 0
        assert worker.text().count("Could not report to the hive") == 1


async def test_real_engine_load_failure_exits_1(tmp_path):
    """The vLLM engine on a folder that is no model: MODEL_LOAD_FAILED, exit 1
    (fails at the tokenizer stage, before any engine process starts)."""
    (tmp_path / "config.json").write_text("{not json")
    proc = await asyncio.create_subprocess_exec(
        WORKER, "--model", str(tmp_path), "--port", str(free_port()),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=proc_env(RBEE_WORKER_API_KEY=KEY),
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "MODEL_LOAD_FAILED" in text
    assert "[model-loader] 📦 Loading model" in text
    assert "Traceback" not in text


async def test_reports_to_the_hive_carry_the_load(tmp_path):
    async with fake_hive() as (hive, hive_address):
        async with fake_worker(
            tmp_path, "--callback", hive_address, "--slots", "2", FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.02",
        ) as worker:
            idle = (await hive.until(WS.WORKER_STATE_IDLE)).worker.load
            assert (idle.slots_total, idle.slots_busy, idle.running_requests) == (2, 0, 0)
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                call = stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=20), metadata=auth_metadata(KEY))
                await call.read()
                busy = (await hive.until(WS.WORKER_STATE_BUSY)).worker.load
                assert (busy.slots_total, busy.slots_busy, busy.running_requests) == (2, 1, 1)
                assert busy.window_ms > 0 and busy.unix_ms > 0
                while await call.read() is not grpc.aio.EOF:
                    pass
            after = (await hive.until(WS.WORKER_STATE_IDLE)).worker.load
            assert after.slots_busy == 0 and after.generation_tokens_per_s > 0
