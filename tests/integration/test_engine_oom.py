"""vLLM's engine process under a real worker, killed for real: by the kernel's
OOM killer (a memory cgroup of its own with a tight limit) it is named
ENGINE_OOM_KILLED; by a plain `kill -9` it is ENGINE_DIED, not OOM.

Two real engine starts (35-60 s each). The OOM test needs root and a memory
cgroup controller it can create cgroups in (the machines here have cgroup v1
at /sys/fs/cgroup/memory); without them it is skipped saying what is missing.
Only the engine process is put in the cgroup, so nothing else (this test
runner least of all) can be the OOM killer's victim.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from rbee.errors import RbeeError, from_rpc_error, from_status_bytes
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from rbee_worker.engine_procs import memory_cgroup
from tests.fixtures.worker import WorkerProcess
from tests.unit.worker.test_program import CALLBACK_KEY, fake_hive

WS = common_pb2.WorkerState
MIB = 1024 * 1024
# How long the engine may take to be OOM-killed once its cgroup is tight.
OOM_WITHIN_S = 90.0
# The worker's own engine check stays out of the way: the worker stays FAILED
# (and answers) after its engine died, instead of exiting at the next check.
NO_ENGINE_CHECK = ("--engine-check-interval", "3600")


def engine_child(worker: WorkerProcess) -> psutil.Process:
    """vLLM's engine core: the worker's child named VLLM::EngineCore."""
    for child in psutil.Process(worker.pid).children():
        try:
            if "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no VLLM::EngineCore child under worker pid {worker.pid}")


def cgroup_home() -> Path:
    """The folder to create a test memory cgroup in, or skip saying what is missing."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to create a memory cgroup (running as uid {os.geteuid()})")
    own = memory_cgroup(os.getpid())
    if own is None:
        pytest.skip(
            "no memory cgroup controller: /proc/self/cgroup names no cgroup v1 'memory' hierarchy, "
            "and /sys/fs/cgroup/cgroup.controllers (v2) has no 'memory'"
        )
    if own.version != 1:
        pytest.skip(f"this test drives cgroup v1 only; {own.path} is cgroup v2")
    if not os.access(own.path, os.W_OK):
        pytest.skip(f"cannot create a cgroup under {own.path}: not writable")
    return own.path


class TightCgroup:
    """A fresh memory cgroup holding one process; removed on the way out."""

    def __init__(self, parent: Path, name: str) -> None:
        self.parent = parent
        self.path = parent / name
        self.path.mkdir()

    def write(self, file: str, value: object) -> None:
        (self.path / file).write_text(f"{value}\n")

    def read_int(self, file: str) -> int:
        return int((self.path / file).read_text().split()[0])

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return -1

    def remove(self) -> None:
        # A process still inside goes back to the parent first.
        for _ in range(100):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except OSError:
                return
            for pid in pids:
                try:
                    (self.parent / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def stream_until_error(address: str, metadata, request_id: str, max_tokens: int, out: dict, **fields) -> None:
    """A Generate that runs until it ends; its tokens and how it ended go to ``out``."""
    tokens = 0
    try:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.GenerateRequest(
                request_id=request_id, prompt="Write a very long story about bees.", max_tokens=max_tokens,
                ignore_eos=True, temperature=0.8, **fields,
            )  # fmt: skip
            for msg in stub.Generate(request, metadata=metadata, timeout=OOM_WITHIN_S + 60):
                if msg.HasField("delta"):
                    tokens += len(msg.delta.token_ids)
                    out["first_token"].set()
        out["result"] = "finished"
    except grpc.RpcError as exc:
        out["result"] = exc
    finally:
        out["tokens"] = tokens
        out["first_token"].set()


def rbee_error(result: object) -> RbeeError:
    assert isinstance(result, grpc.RpcError), f"the stream did not fail: {result!r}"
    return from_rpc_error(result)


def later_generate_error(worker: WorkerProcess) -> RbeeError:
    with grpc.insecure_channel(worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=2), metadata=worker.metadata, timeout=30))
    return from_rpc_error(info.value)


async def test_a_real_oom_kill_of_the_engine_is_named_engine_oom_killed(start_worker):
    parent = cgroup_home()
    async with fake_hive() as (hive, hive_address):
        worker = await asyncio.to_thread(
            start_worker, slots=4, extra_args=["--callback", hive_address, *NO_ENGINE_CHECK],
            env={"RBEE_CALLBACK_API_KEY": CALLBACK_KEY},
        )  # fmt: skip
        engine = engine_child(worker)
        cgroup = TightCgroup(parent, f"rbee-engine-oom-{os.getpid()}")
        try:
            # Only the engine process moves; its memory so far stays charged
            # where it was, so the new cgroup counts what it allocates from now on.
            cgroup.write("cgroup.procs", engine.pid)
            assert str(engine.pid) in (cgroup.path / "cgroup.procs").read_text().split()
            await asyncio.sleep(1.5)  # the worker's watch re-reads its cgroup every 0.5 s
            limit = cgroup.read_int("memory.usage_in_bytes") + MIB
            cgroup.write("memory.limit_in_bytes", limit)
            started = time.monotonic()

            # Two streams in flight (slowed by the tight cgroup, but running)...
            results = [{"first_token": threading.Event()} for _ in range(3)]
            threads = [
                threading.Thread(target=stream_until_error, args=(worker.address, worker.metadata, f"oom-{i}", 1500, out),
                                 daemon=True)
                for i, out in enumerate(results[:2])
            ]  # fmt: skip
            for t in threads:
                t.start()
            for out in results[:2]:
                await asyncio.to_thread(out["first_token"].wait, 60)
            # ...then one with a JSON schema: the engine process compiles its
            # grammar, which takes memory its cgroup does not have. The kernel kills it.
            schema = json.dumps({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
            threads.append(threading.Thread(
                target=stream_until_error, args=(worker.address, worker.metadata, "oom-json", 40, results[2]),
                kwargs={"json_schema": schema}, daemon=True,
            ))  # fmt: skip
            threads[-1].start()
            for t in threads:
                await asyncio.to_thread(t.join, OOM_WITHIN_S)
            elapsed = time.monotonic() - started
            assert all("result" in r for r in results), f"streams still running after {elapsed:.0f} s\n{worker.log_tail()}"
            assert cgroup.oom_kills() >= 1, f"the kernel killed nothing in {cgroup.path}\n{worker.log_tail()}"
            assert not engine.is_running(), "the engine process survived"

            # Every stream in flight ends with the code, naming the engine's pid.
            for r in results:
                err = rbee_error(r["result"])
                assert err.code == "ENGINE_OOM_KILLED", f"{err}\n{worker.log_tail()}"
                assert err.details["pid"] == str(engine.pid)
                assert err.details["signal"] == "SIGKILL"
                assert err.details["cgroup"].endswith("/" + cgroup.path.name)
                assert err.details["cgroup_limit_mib"] == f"{limit / MIB:.0f}"
                assert int(err.details["rss_mib"]) > 100  # the engine's resident memory, from the kernel's record
                assert err.details["evidence"].startswith(f"kernel log: Memory cgroup out of memory: Killed process {engine.pid}")
                assert "OOM killer" in err.message and f"(pid {engine.pid})" in err.message
                assert any("--slots N" in s and "(this worker: 4)" in s for s in err.suggestions)
                assert any("--max-model-len N" in s for s in err.suggestions)
                assert any("VLLM_CPU_KVCACHE_SPACE" in s for s in err.suggestions)

            # So does any later request; the worker says FAILED.
            later = await asyncio.to_thread(later_generate_error, worker)
            assert later.code == "ENGINE_OOM_KILLED" and later.details["pid"] == str(engine.pid)

            # The hive heard it, with the code.
            failed = from_status_bytes((await hive.until(WS.WORKER_STATE_FAILED)).error_status)
            assert failed.code == "ENGINE_OOM_KILLED"
            assert failed.details["pid"] == str(engine.pid)

            log = worker.log_text()
            assert "💀 ENGINE_OOM_KILLED: The kernel's OOM killer killed vLLM's engine process VLLM::EngineCore" in log
            assert f"(pid {engine.pid})" in log
            assert "🔎 Evidence: kernel log: Memory cgroup out of memory: Killed process" in log
            assert "💡 Give the worker fewer request slots" in log
            assert "ENGINE_DIED" not in log
        finally:
            cgroup.remove()
    assert not cgroup.path.exists()


async def test_a_plain_kill_9_of_the_engine_is_not_called_oom(start_worker):
    worker = await asyncio.to_thread(start_worker, slots=2, extra_args=["--engine-check-interval", "1"])
    engine = engine_child(worker)
    result: dict = {"first_token": threading.Event()}
    stream = threading.Thread(
        target=stream_until_error, args=(worker.address, worker.metadata, "killed", 1500, result), daemon=True
    )
    stream.start()
    assert await asyncio.to_thread(result["first_token"].wait, 60)
    os.kill(engine.pid, signal.SIGKILL)
    await asyncio.to_thread(stream.join, 60)

    err = rbee_error(result.get("result"))
    assert err.code == "ENGINE_DIED", f"{err}\n{worker.log_tail()}"
    assert err.details["signal"] == "SIGKILL" and err.details["engine_pid"] == str(engine.pid)
    assert "was killed by SIGKILL" in err.message
    assert "not by the kernel's OOM killer" in err.message
    assert result["tokens"] > 0

    # The worker's engine check then stops it: exit 1, the code in its log.
    assert await asyncio.to_thread(worker.proc.wait, 60) == 1
    log = worker.log_text()
    assert "💀 ENGINE_DIED: vLLM's engine process" in log and f"(pid {engine.pid}) was killed by SIGKILL" in log
    assert "ENGINE_OOM_KILLED" not in log
    assert "stopped (exit 1)" in log
