"""Naming the death of vLLM's engine process (rbee_worker/engine_procs.py,
engine_watch.py, engine_death.py): the kernel-log and cgroup readers on fake
files, the classifier on fake evidence, the watch on a fake /proc and on a
real process, and what the servicer does with the verdict (FakeEngine)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from rbee.errors import RbeeError, from_rpc_error
from rbee.kernel_log import OomKill, oom_kills, read_kernel_log
from rbee.v1 import common_pb2
from rbee_worker.engine_death import DIED_CODE, OOM_CODE, EngineDeath, ProcessEvidence, Remedies, classify
from rbee_worker.engine_procs import MemoryCgroup, is_alive, memory_cgroup
from rbee_worker.engine_watch import EngineWatch
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import worker_harness

WS = common_pb2.WorkerState
MIB = 1024 * 1024

# What this kernel (6.18) wrote for a memory cgroup OOM kill, with the pid changed.
KILL_LINE = (
    "Memory cgroup out of memory: Killed process 4242 (VLLM::EngineCor) total-vm:1093312kB, "
    "anon-rss:84300kB, file-rss:27580kB, shmem-rss:0kB, UID:0 pgtables:340kB oom_score_adj:0"
)
OOM_KILL_LINE = (
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
    "oom_memcg=/rbee/engine-test,task_memcg=/rbee/engine-test,task=VLLM::EngineCor,pid=4242,uid=0"
)


def kmsg_file(path: Path, *records: tuple[int, str]) -> Path:
    path.write_text("".join(f"6,{seq},{seq * 1000},-;{text}\n" for seq, text in records))
    return path


# -- the kernel log ------------------------------------------------------------


def test_kernel_records_after_a_sequence_number(tmp_path):
    path = kmsg_file(tmp_path / "kmsg", (1, "boot"), (7, OOM_KILL_LINE), (8, KILL_LINE))
    assert [r.seq for r in read_kernel_log(path)] == [1, 7, 8]
    assert [r.text for r in read_kernel_log(path, after_seq=7)] == [KILL_LINE]
    assert read_kernel_log(tmp_path / "no-such-device") is None


def test_oom_kills_are_found_by_pid_with_memory_and_cgroup(tmp_path):
    records = read_kernel_log(kmsg_file(tmp_path / "kmsg", (7, OOM_KILL_LINE), (8, KILL_LINE)))
    kills = oom_kills(records, [4242, 5000])
    assert set(kills) == {4242}
    kill = kills[4242]
    assert kill.name == "VLLM::EngineCor"
    assert kill.rss_kb == 84300 + 27580
    assert kill.memcg == "/rbee/engine-test"
    assert kill.line == KILL_LINE
    # A pid that merely starts or ends with the same digits is someone else.
    assert oom_kills(records, [424, 42421, 24242]) == {}


def test_global_oom_kill_line_is_recognised(tmp_path):
    line = "Out of memory: Killed process 77 (python3) total-vm:10kB, anon-rss:4096kB, file-rss:0kB, shmem-rss:0kB"
    records = read_kernel_log(kmsg_file(tmp_path / "kmsg", (3, line)))
    assert oom_kills(records, [77])[77].rss_kb == 4096


# -- memory cgroups --------------------------------------------------------------


def fake_proc(root: Path, pid: int, cgroup: str, state: str = "S", name: str = "python", children: str = "") -> None:
    d = root / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text(cgroup)
    (d / "stat").write_text(f"{pid} ({name}) {state} 1 {pid} {pid} 0 -1\n")
    (d / "statm").write_text("300000 25600 1000 1 0 2000 0\n")
    (d / "cmdline").write_bytes(name.encode() + b"\0")
    (d / "task" / str(pid) / "children").write_text(children)


def replace_text(path: Path, text: str) -> None:
    """Change a fake /proc or cgroup file at once, as the kernel does: the
    watch polls every 20 ms and must never read it half written."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def fake_cgroup_v1(fs: Path, name: str, oom_kill: int | None = 0, limit: int = 1 << 62) -> Path:
    d = fs / "memory" / name.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    lines = "oom_kill_disable 0\nunder_oom 0\n" + (f"oom_kill {oom_kill}\n" if oom_kill is not None else "")
    (d / "memory.oom_control").write_text(lines)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    return d


def test_cgroup_v1_memory_controller_counter_and_limit(tmp_path):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    fake_proc(proc, 10, "9:name=systemd:/\n4:memory:/rbee/a\n3:cpuset:/\n0::/\n")
    fake_cgroup_v1(fs, "/rbee/a", oom_kill=3, limit=640 * MIB)
    cg = memory_cgroup(10, proc, fs)
    assert cg == MemoryCgroup("/rbee/a", fs / "memory" / "rbee" / "a", 1)
    assert cg.oom_kill_count() == 3
    assert cg.limit_bytes() == 640 * MIB


def test_cgroup_v1_without_limit_or_counter(tmp_path):
    # Kernels before 4.13 keep no oom_kill line; "no limit" is a huge number.
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    fake_proc(proc, 10, "4:memory:/\n")
    fake_cgroup_v1(fs, "/", oom_kill=None)
    cg = memory_cgroup(10, proc, fs)
    assert cg.oom_kill_count() is None and cg.limit_bytes() is None


def test_cgroup_v2_memory_events(tmp_path):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    fake_proc(proc, 10, "0::/user.slice/engine\n")
    fs.mkdir()
    (fs / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    d = fs / "user.slice" / "engine"
    d.mkdir(parents=True)
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n")
    (d / "memory.max").write_text("max\n")
    cg = memory_cgroup(10, proc, fs)
    assert (cg.version, cg.name, cg.oom_kill_count(), cg.limit_bytes()) == (2, "/user.slice/engine", 2, None)
    (d / "memory.max").write_text(f"{512 * MIB}\n")
    assert cg.limit_bytes() == 512 * MIB


def test_no_memory_controller_and_gone_process(tmp_path):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    fake_proc(proc, 10, "0::/\n")
    fs.mkdir()
    (fs / "cgroup.controllers").write_text("cpu pids\n")
    assert memory_cgroup(10, proc, fs) is None
    assert memory_cgroup(11, proc, fs) is None


def test_zombies_are_not_alive(tmp_path):
    proc = tmp_path / "proc"
    fake_proc(proc, 10, "", state="S", name="odd ) name")
    fake_proc(proc, 11, "", state="Z")
    assert is_alive(10, proc) and not is_alive(11, proc) and not is_alive(12, proc)


# -- the classifier ------------------------------------------------------------------

REMEDIES = Remedies(backend="cpu", slots=8, max_model_len=2048, kv_cache_gib="1")
CHILD = ProcessEvidence(4242, "VLLM::EngineCore", "/rbee/engine-test", 640 * MIB, 0, 0, 600 * MIB)
GRANDCHILD = ProcessEvidence(4250, "VLLM::Worker", "/rbee/engine-test", 640 * MIB, 0, 0, 1900 * MIB)


def death(exitcode, processes=(CHILD,), kills=(), kernel_log_read=True) -> EngineDeath:
    return EngineDeath(4242, "VLLM::EngineCore", exitcode, tuple(processes), tuple(kills), kernel_log_read, REMEDIES)


def test_kernel_log_names_the_child_oom_killed():
    kill = OomKill(4242, "VLLM::EngineCor", 111880, "/rbee/engine-test", KILL_LINE)
    err = classify(death(-signal.SIGKILL, kills=[kill]))
    assert err.code == OOM_CODE
    assert err.status_code == grpc.StatusCode.INTERNAL
    assert "OOM killer" in err.message and "pid 4242" in err.message and "109 MiB" in err.message
    assert "/rbee/engine-test hit its limit of 640 MiB" in err.message
    assert err.details["pid"] == "4242" and err.details["signal"] == "SIGKILL"
    assert err.details["rss_mib"] == "109" and err.details["cgroup_limit_mib"] == "640"
    assert err.details["evidence"] == f"kernel log: {KILL_LINE}"
    text = "\n".join(err.suggestions)
    for remedy in ("--slots N", "this worker: 8", "--max-model-len N", "this worker: 2048",
                   "VLLM_CPU_KVCACHE_SPACE", "1 GiB", "raise the memory limit of cgroup /rbee/engine-test"):
        assert remedy in text, remedy


def test_cgroup_counter_with_sigkill_is_evidence_enough():
    counted = ProcessEvidence(4242, "VLLM::EngineCore", "/rbee/engine-test", 640 * MIB, 0, 1, 600 * MIB)
    err = classify(death(-signal.SIGKILL, processes=[counted], kernel_log_read=False))
    assert err.code == OOM_CODE
    assert "oom_kill count went from 0 to 1" in err.details["evidence"]
    assert err.details["rss_mib"] == "600"  # the last figure seen alive


def test_cgroup_counter_without_sigkill_is_not_the_childs_oom_kill():
    # Someone else in the cgroup was OOM-killed; the engine exited by itself.
    counted = ProcessEvidence(4242, "VLLM::EngineCore", "/", None, 5, 6, 600 * MIB)
    err = classify(death(1, processes=[counted]))
    assert err.code == DIED_CODE
    assert "exited with code 1" in err.message and err.details["exit_code"] == "1"


def test_oom_kill_of_the_engines_own_child_is_named():
    kill = OomKill(4250, "VLLM::Worker", 1900 * 1024, "/rbee/engine-test", "Memory cgroup out of memory: Killed process 4250")
    err = classify(death(1, processes=[CHILD, GRANDCHILD], kills=[kill]))
    assert err.code == OOM_CODE
    assert err.details["pid"] == "4250" and err.details["engine_pid"] == "4242"
    assert "VLLM::Worker (pid 4250), a process of vLLM's engine VLLM::EngineCore (pid 4242)" in err.message
    assert "then exited with code 1" in err.message


def test_plain_sigkill_is_not_called_oom():
    err = classify(death(-signal.SIGKILL))
    assert err.code == DIED_CODE
    assert "was killed by SIGKILL" in err.message and "not by the kernel's OOM killer" in err.message
    assert err.details["signal"] == "SIGKILL" and "OOM" not in err.code


def test_sigkill_without_any_kernel_evidence_says_it_cannot_tell():
    blind = ProcessEvidence(4242, "VLLM::EngineCore")
    err = classify(death(-signal.SIGKILL, processes=[blind], kernel_log_read=False))
    assert err.code == DIED_CODE
    assert "cannot be told here" in err.message


def test_crash_with_exit_code():
    err = classify(death(139))
    assert err.code == DIED_CODE and "exited with code 139" in err.message
    assert any("log" in s for s in err.suggestions)


# -- the watch -------------------------------------------------------------------------


class counted_looks:
    """Counts a watch's looks at the engine's processes (each round of its loop
    checks whether the child is gone), so a test waits for rounds, not time."""

    def __init__(self, watch: EngineWatch) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        real = watch._child_gone

        def counting() -> bool:
            self.count += 1
            self._changed.set()
            return real()

        watch._child_gone = counting

    async def after(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` more looks have been taken."""
        target = self.count + n
        async with asyncio.timeout(timeout):
            while self.count < target:
                self._changed.clear()
                await self._changed.wait()


async def test_watch_follows_a_move_to_another_cgroup_and_counts_its_oom_kill(tmp_path):
    proc, fs, kmsg = tmp_path / "proc", tmp_path / "cgroup", tmp_path / "kmsg"
    kmsg.write_text("")  # readable, and never names the engine
    fake_proc(proc, 4242, "4:memory:/job\n", name="VLLM::EngineCore", children="4250")
    fake_proc(proc, 4250, "4:memory:/job\n", name="VLLM::Worker")
    fake_cgroup_v1(fs, "/job", oom_kill=7)
    moved = fake_cgroup_v1(fs, "/job/engine", oom_kill=0, limit=300 * MIB)
    exit_code: list[int | None] = [None]
    watch = EngineWatch(4242, "VLLM::EngineCore", lambda: exit_code[0], REMEDIES, 0.02, kmsg, proc, fs)
    heard: list[RbeeError] = []
    looks = counted_looks(watch)
    watch.start()
    watch.on_death(heard.append)
    try:
        await looks.after(2)
        assert watch.verdict is None
        # An operator (or systemd) moves the engine into another cgroup while it runs.
        replace_text(proc / "4242" / "cgroup", "4:memory:/job/engine\n")
        await looks.after(2)  # seen in its new cgroup before the kill
        # The kernel kills it there; vLLM reaps it.
        replace_text(moved / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
        replace_text(proc / "4242" / "stat", "4242 (VLLM::EngineCore) Z 1 4242 4242 0 -1\n")
        exit_code[0] = -signal.SIGKILL
        err = await watch.wait_verdict(5)
    finally:
        await watch.stop()
    assert err is not None and err.code == OOM_CODE
    assert err.details["cgroup"] == "/job/engine" and err.details["cgroup_limit_mib"] == "300"
    assert "oom_kill count went from 0 to 1" in err.details["evidence"]
    assert [e.code for e in heard] == [OOM_CODE]
    assert watch.death is not None and {p.pid for p in watch.death.processes} == {4242, 4250}


async def test_watch_names_a_real_sigkill_as_a_death_not_oom(tmp_path):
    kmsg = tmp_path / "kmsg"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # An OOM kill of the same pid number before the watch started (pids are
    # reused): not this process's.
    kmsg_file(kmsg, (5, f"Memory cgroup out of memory: Killed process {child.pid} (python)"))
    watch = EngineWatch(child.pid, "VLLM::EngineCore", child.poll, REMEDIES, 0.05, kmsg, cgroup_fs=tmp_path / "none")
    watch.start()
    try:
        child.send_signal(signal.SIGKILL)
        err = await watch.wait_verdict(10)
    finally:
        await watch.stop()
        child.wait()
    assert err is not None and err.code == DIED_CODE, err
    assert err.details["signal"] == "SIGKILL" and err.details["engine_pid"] == str(child.pid)
    assert "not by the kernel's OOM killer" in err.message


async def test_watch_names_a_real_process_the_kernel_log_says_was_oom_killed(tmp_path):
    kmsg = kmsg_file(tmp_path / "kmsg", (5, "boot"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = EngineWatch(child.pid, "VLLM::EngineCore", child.poll, REMEDIES, 0.05, kmsg, cgroup_fs=tmp_path / "none")
    watch.start()
    try:
        with kmsg.open("a") as f:
            f.write(f"3,6,6000,-;Out of memory: Killed process {child.pid} (python) total-vm:20000kB, "
                    "anon-rss:10240kB, file-rss:0kB, shmem-rss:0kB\n")
        child.send_signal(signal.SIGKILL)
        err = await watch.wait_verdict(10)
    finally:
        await watch.stop()
        child.wait()
    assert err is not None and err.code == OOM_CODE, err
    assert err.details["pid"] == str(child.pid) and err.details["rss_mib"] == "10"
    assert "OOM killer" in err.message


async def test_a_stopped_watch_reports_nothing(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = EngineWatch(child.pid, "VLLM::EngineCore", child.poll, REMEDIES, 0.05, tmp_path / "kmsg")
    # A second watch of the same child, left running: it names the death, so the
    # stopped one had every chance to.
    witness = EngineWatch(child.pid, "VLLM::EngineCore", child.poll, REMEDIES, 0.05, tmp_path / "kmsg")
    heard: list[RbeeError] = []
    looks = counted_looks(watch)
    watch.start()
    witness.start()
    watch.on_death(heard.append)
    await watch.stop()  # a shutdown on purpose
    looked = looks.count
    child.kill()
    child.wait()
    try:
        assert await witness.wait_verdict(30) is not None
    finally:
        await witness.stop()
    assert heard == [] and watch.verdict is None
    assert looks.count == looked, "the stopped watch kept looking"


# -- the worker's answer to the verdict (servicer, FakeEngine) --------------------------


def oom_error() -> RbeeError:
    return classify(death(-signal.SIGKILL, kills=[OomKill(4242, "VLLM::EngineCor", 111880, "/rbee/engine-test", KILL_LINE)]))


async def test_engine_death_fails_streams_in_flight_and_later_requests_with_its_code():
    async with worker_harness(FakeEngine(mode="gated", max_model_len=256)) as h:
        call = h.generate(request_id="in-flight", max_tokens=50)
        h.engine.release(2)
        await h.engine.started["in-flight"].wait()
        first = await call.read()
        assert first.delta.token_ids
        h.engine.die(oom_error())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while (await call.read()) is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.INTERNAL
        err = from_rpc_error(info.value)
        assert err.code == OOM_CODE and err.details["pid"] == "4242"
        assert any("--slots" in s for s in err.suggestions)

        with pytest.raises(grpc.aio.AioRpcError) as later:
            await h.collect(request_id="later")
        again = from_rpc_error(later.value)
        assert again.code == OOM_CODE and "engine has stopped" in again.message
        assert again.details["worker_id"] == "w-unit"

        assert (await h.readiness()).state == WS.WORKER_STATE_FAILED
        assert h.status.error.code == OOM_CODE
        log = h.log.getvalue()
        assert f"💀 {OOM_CODE}: The kernel's OOM killer killed" in log
        assert "🔎 Evidence: kernel log: Memory cgroup out of memory: Killed process 4242" in log
        assert "💡 Give the worker fewer request slots" in log
        assert h.servicer.slots_busy == 0


async def test_plain_engine_death_is_reported_as_died():
    async with worker_harness(FakeEngine(max_model_len=256)) as h:
        h.engine.die(classify(death(-signal.SIGKILL)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect(request_id="after")
        err = from_rpc_error(info.value)
        assert err.code == DIED_CODE and err.details["signal"] == "SIGKILL"
        assert OOM_CODE not in h.log.getvalue()
