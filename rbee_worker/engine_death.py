"""Why vLLM's engine process died, told from the kernel's own records.

The worker runs vLLM's engine core in a child process (which may start
processes of its own, e.g. ``VLLM::Worker`` on CPU). When that child dies the
worker must say what happened: killed by the kernel's OOM killer
(``ENGINE_OOM_KILLED``) or anything else (``ENGINE_DIED`` with the signal or
exit code). SIGKILL alone proves nothing (a user's ``kill -9`` looks the same),
so an OOM kill is named only on evidence from the kernel:

- the kernel log (``/dev/kmsg``, readable as root): ``Killed process PID
  (name) total-vm:…, anon-rss:…`` and ``oom-kill:…,oom_memcg=…,pid=PID`` for
  one of the engine's processes, in a record written after the engine started;
- the OOM kill counter of the memory cgroup the process was in (cgroup v1
  ``memory.oom_control`` line ``oom_kill``; v2 ``memory.events`` line
  ``oom_kill``) having gone up while the process was gone, together with a
  SIGKILL where the exit status is known.

``EngineWatch`` follows the engine's processes while they live (pids,
their memory cgroup, which can change, its counter, their resident memory)
and gathers that evidence the moment the engine child ends;
``classify`` turns an ``EngineDeath`` into the error the worker reports.
Everything here reads files only, so tests drive it with fake ``/proc``,
cgroup and kernel-log paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee.errors import RbeeError
from rbee.kernel_log import KMSG, OomKill, last_kernel_seq, oom_kills, read_kernel_log

log = logging.getLogger(__name__)

PROC = Path("/proc")
CGROUP_FS = Path("/sys/fs/cgroup")
# How often the engine's processes are looked at while they live.
WATCH_INTERVAL_S = 0.5
# cgroup v1 reports "no limit" as a huge page-aligned number.
_UNLIMITED = 1 << 60
MIB = 1024 * 1024

OOM_CODE = "ENGINE_OOM_KILLED"
DIED_CODE = "ENGINE_DIED"


# -- memory cgroups ---------------------------------------------------------------


@dataclass(frozen=True)
class MemoryCgroup:
    """The memory cgroup a process is in: its name (as /proc/PID/cgroup
    gives it) and its folder in the cgroup filesystem."""

    name: str
    path: Path
    version: int  # 1 or 2

    def _read(self, file: str) -> str | None:
        try:
            return (self.path / file).read_text()
        except OSError:
            return None

    def oom_kill_count(self) -> int | None:
        """Processes of this cgroup the OOM killer has killed (None when the
        kernel does not count them here)."""
        text = self._read("memory.oom_control" if self.version == 1 else "memory.events")
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def limit_bytes(self) -> int | None:
        """The cgroup's own memory limit (None: none, or unknown)."""
        text = self._read("memory.limit_in_bytes" if self.version == 1 else "memory.max")
        if text is None or text.strip() == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= _UNLIMITED else value


def memory_cgroup(pid: int, proc: Path = PROC, fs: Path = CGROUP_FS) -> MemoryCgroup | None:
    """The memory cgroup of a live process (None when it is gone or the
    machine has no memory controller)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    unified: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, name = parts
        if "memory" in controllers.split(","):
            return MemoryCgroup(name, fs / "memory" / name.lstrip("/"), 1)
        if hierarchy == "0" and controllers == "":
            unified = name
    if unified is None:
        return None
    # cgroup v2: the unified hierarchy at the root (or at ./unified on hybrid
    # machines, where it has no memory controller; v1's line won above).
    for root in (fs, fs / "unified"):
        try:
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return MemoryCgroup(unified, root / unified.lstrip("/"), 2)
        except OSError:
            continue
    return None


def resident_bytes(pid: int, proc: Path = PROC) -> int | None:
    try:
        fields = (proc / str(pid) / "statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def is_alive(pid: int, proc: Path = PROC) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return text.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def process_name(pid: int, proc: Path = PROC) -> str:
    for file in ("cmdline", "comm"):
        try:
            text = (proc / str(pid) / file).read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if text:
            # vLLM names its processes (VLLM::EngineCore); plain ones are a path.
            return text if "::" in text else Path(text).name
    return ""


def children_of(pid: int, proc: Path = PROC) -> list[int]:
    """Direct children (every thread's list; /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


# -- evidence and verdict -------------------------------------------------------------


@dataclass(frozen=True)
class ProcessEvidence:
    """One of the engine's processes as last seen, and its cgroup's counter."""

    pid: int
    name: str
    cgroup: str | None = None
    cgroup_limit_bytes: int | None = None
    # The cgroup's OOM kill count while the process was alive, and after it was gone.
    oom_kills_before: int | None = None
    oom_kills_after: int | None = None
    rss_bytes: int | None = None

    @property
    def counted_oom_kill(self) -> bool:
        return (
            self.oom_kills_before is not None
            and self.oom_kills_after is not None
            and self.oom_kills_after > self.oom_kills_before
        )


@dataclass(frozen=True)
class Remedies:
    """The worker's own settings, for suggestions that name real values."""

    backend: str = "cpu"
    slots: int | None = None
    max_model_len: int | None = None
    # VLLM_CPU_KVCACHE_SPACE in GiB (CPU).
    kv_cache_gib: str | None = None


@dataclass(frozen=True)
class EngineDeath:
    """Everything known once the engine child has ended."""

    pid: int
    name: str
    # multiprocessing's convention: -N = killed by signal N; None = unknown.
    exitcode: int | None
    # The engine child first, then the processes it started.
    processes: tuple[ProcessEvidence, ...] = ()
    # OOM kills the kernel log names among those processes (since the engine started).
    kernel_kills: tuple[OomKill, ...] = ()
    # Whether the kernel log could be read at all.
    kernel_log_read: bool = False
    remedies: Remedies = field(default_factory=Remedies)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "ended (exit status unknown)"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _mib(value: int | None) -> str | None:
    return None if value is None else f"{value / MIB:.0f}"


def oom_suggestions(remedies: Remedies, cgroup: str | None, limit_bytes: int | None) -> list[str]:
    r = remedies
    now = lambda value: f" (this worker: {value})" if value is not None else ""  # noqa: E731
    out = [
        "Give the worker fewer request slots: llm-worker-rbee --slots N, or through a hive "
        f"`rbee-keeper workers spawn … --slots N`{now(r.slots)}",
        f"Give it a shorter context: llm-worker-rbee --max-model-len N{now(r.max_model_len)}",
    ]
    if r.backend == "cpu":
        out.append(
            "Give it a smaller KV cache: VLLM_CPU_KVCACHE_SPACE=GiB in the worker's environment "
            "(a hive passes VLLM_* variables of its own environment to its workers)"
            + now(f"{r.kv_cache_gib} GiB" if r.kv_cache_gib else None)
        )
    if cgroup and limit_bytes is not None:
        out.append(f"Or raise the memory limit of cgroup {cgroup} ({limit_bytes / MIB:.0f} MiB now)")
    else:
        out.append("Or free memory on the node (stop other workers) before starting a new worker")
    return out


def classify(death: EngineDeath) -> RbeeError:
    """ENGINE_OOM_KILLED on the kernel's evidence, ENGINE_DIED otherwise."""
    by_pid = {p.pid: p for p in death.processes}
    child = by_pid.get(death.pid, ProcessEvidence(death.pid, death.name))
    exit_text = describe_exit(death.exitcode)
    details: dict[str, Any] = {"engine_pid": death.pid, "engine_process": death.name or "engine"}
    if death.exitcode is not None and death.exitcode >= 0:
        details["exit_code"] = death.exitcode
    sig = _signal_name(death.exitcode)
    if sig:
        details["signal"] = sig

    # The kernel log names the victim: the child's own entry first.
    kills = sorted(death.kernel_kills, key=lambda k: k.pid != death.pid)
    victim_pid: int | None = kills[0].pid if kills else None
    kill = kills[0] if kills else None
    evidence = f"kernel log: {kill.line}" if kill and kill.line else ("kernel log (oom-kill record)" if kill else "")
    if victim_pid is None:
        # The cgroup's counter went up while the process was gone; for the
        # child, whose exit status is known, only with a SIGKILL.
        for p in [child, *(p for p in death.processes if p.pid != death.pid)]:
            if not p.counted_oom_kill:
                continue
            if p.pid == death.pid and death.exitcode is not None and death.exitcode != -signal.SIGKILL:
                continue
            victim_pid = p.pid
            evidence = (
                f"memory cgroup {p.cgroup}: oom_kill count went from {p.oom_kills_before} "
                f"to {p.oom_kills_after} while pid {p.pid} ended"
            )
            break

    if victim_pid is None:
        message = f"vLLM's engine process {death.name or 'engine'} (pid {death.pid}) {exit_text}"
        if death.exitcode == -signal.SIGKILL:
            if death.kernel_log_read or any(p.oom_kills_after is not None for p in death.processes):
                message += "; not by the kernel's OOM killer (the kernel recorded no OOM kill of it)"
            else:
                message += (
                    "; whether the kernel's OOM killer did it cannot be told here "
                    "(the kernel log is not readable and its memory cgroup keeps no OOM count)"
                )
        return RbeeError(
            DIED_CODE,
            message + ". The worker cannot serve requests any more.",
            details,
            ["Read the worker's log above this line for the engine's own error", "Start a new worker for this model"],
        )

    victim = by_pid.get(victim_pid, ProcessEvidence(victim_pid, kill.name if kill else ""))
    name = victim.name or (kill.name if kill else "") or "engine"
    rss_kb = kill.rss_kb if kill is not None and kill.pid == victim_pid else None
    rss = rss_kb * 1024 if rss_kb is not None else victim.rss_bytes
    cgroup = (kill.memcg if kill is not None and kill.memcg else None) or victim.cgroup
    limit = victim.cgroup_limit_bytes if (cgroup == victim.cgroup) else None
    details.update(pid=victim_pid, process=name, evidence=evidence)
    details.setdefault("signal", "SIGKILL")
    if rss is not None:
        details["rss_mib"] = _mib(rss)
    if cgroup:
        details["cgroup"] = cgroup
    if limit is not None:
        details["cgroup_limit_mib"] = _mib(limit)

    what = f"vLLM's engine process {name} (pid {victim_pid})"
    if victim_pid != death.pid:
        what = f"{name} (pid {victim_pid}), a process of vLLM's engine {death.name or 'engine'} (pid {death.pid}),"
    memory = f" at {rss / MIB:.0f} MiB resident" if rss is not None else ""
    where = ""
    if cgroup and cgroup != "/":
        where = f"; its memory cgroup {cgroup} hit its limit" + (f" of {limit / MIB:.0f} MiB" if limit is not None else "")
    elif cgroup == "/":
        where = "; the node ran out of memory"
    after = f" (the engine process then {exit_text})" if victim_pid != death.pid else ""
    message = (
        f"The kernel's OOM killer killed {what}{memory}{where}{after}. "
        "Out of memory: the worker cannot serve requests any more."
    )
    return RbeeError(OOM_CODE, message, details, oom_suggestions(death.remedies, cgroup, limit))


# -- watching the engine ---------------------------------------------------------------


@dataclass
class _Tracked:
    pid: int
    name: str
    cgroup: MemoryCgroup | None = None
    oom_kills: int | None = None
    # The count one look earlier in the same cgroup: the kernel counts a kill
    # when it sends it, and the victim may still look alive at the next look,
    # which would otherwise take the raised count as the one before.
    oom_kills_earlier: int | None = None
    rss_bytes: int | None = None
    alive: bool = True

    @property
    def oom_kills_before(self) -> int | None:
        return self.oom_kills_earlier if self.oom_kills_earlier is not None else self.oom_kills


class EngineWatch:
    """Follows the engine child and the processes it starts; when the child
    ends, gathers the evidence and classifies the death once.

    ``exitcode`` gives the child's exit status once it has been reaped
    (vLLM's process object; None while unknown). Every path is a parameter
    so tests can fake the kernel."""

    def __init__(
        self,
        pid: int,
        name: str,
        exitcode: Callable[[], int | None] = lambda: None,
        remedies: Remedies | None = None,
        interval_s: float = WATCH_INTERVAL_S,
        kmsg: Path = KMSG,
        proc: Path = PROC,
        cgroup_fs: Path = CGROUP_FS,
    ) -> None:
        self.pid = pid
        # The title the process gave itself (VLLM::EngineCore) over the given name.
        self.name = process_name(pid, proc) if "::" in process_name(pid, proc) else name
        self._exitcode = exitcode
        self._remedies = remedies or Remedies()
        self._interval_s = interval_s
        self._kmsg = kmsg
        self._proc = proc
        self._fs = cgroup_fs
        self._tracked: dict[int, _Tracked] = {}
        self._kmsg_start: int | None = None
        self._task: asyncio.Task | None = None
        self._verdict: asyncio.Future[RbeeError] | None = None
        self._wake = asyncio.Event()
        self._listeners: list[Callable[[RbeeError], None]] = []
        self.death: EngineDeath | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._verdict = loop.create_future()
        # Only kernel records written from now on can be about this engine
        # (pids are reused; older OOM kills of the same number are someone else's).
        self._kmsg_start = last_kernel_seq(self._kmsg)
        self._observe()
        self._task = loop.create_task(self._run(), name="engine-watch")

    async def stop(self) -> None:
        """Stop watching (a shutdown on purpose is no death)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def on_death(self, listener: Callable[[RbeeError], None]) -> None:
        self._listeners.append(listener)
        if self._verdict is not None and self._verdict.done():
            listener(self._verdict.result())

    @property
    def verdict(self) -> RbeeError | None:
        """Why the engine died (a fresh error each time, for each caller to
        raise); None while it lives."""
        v = self._verdict
        return _copy(v.result()) if v is not None and v.done() else None

    async def wait_verdict(self, timeout_s: float) -> RbeeError | None:
        """The verdict, looking now (a caller saw the engine fail) and
        waiting up to ``timeout_s`` for the child to be gone."""
        if self._verdict is None:
            return None
        self._wake.set()
        try:
            return _copy(await asyncio.wait_for(asyncio.shield(self._verdict), timeout_s))
        except TimeoutError:
            return None

    # -- looking ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._child_gone():
                break
            # A few small /proc and cgroup files per process: off the server's loop.
            await asyncio.to_thread(self._observe)
        # Reaped by vLLM's monitor thread: give it a moment for the exit status.
        exitcode = self._exitcode()
        for _ in range(20):
            if exitcode is not None:
                break
            await asyncio.sleep(0.05)
            exitcode = self._exitcode()
        death = await asyncio.to_thread(self._gather, exitcode)
        self.death = death
        err = classify(death)
        log.debug("engine death: %r -> %s", death, err.code)
        assert self._verdict is not None
        if not self._verdict.done():
            self._verdict.set_result(err)
        for listener in list(self._listeners):
            try:
                listener(err)
            except Exception:  # noqa: BLE001 - a listener must not stop the others
                log.exception("engine death listener failed")

    def _child_gone(self) -> bool:
        return not is_alive(self.pid, self._proc)

    def _observe(self) -> None:
        """Note the engine's processes, their cgroups (re-read: a process can
        be moved) and counters, while they are known to be alive."""
        pids = [self.pid]
        seen = {self.pid}
        i = 0
        while i < len(pids):
            for c in children_of(pids[i], self._proc):
                if c not in seen:
                    seen.add(c)
                    pids.append(c)
            i += 1
        for pid in pids:
            t = self._tracked.get(pid)
            if t is None:
                t = self._tracked[pid] = _Tracked(pid, process_name(pid, self._proc) or (self.name if pid == self.pid else ""))
            cg = memory_cgroup(pid, self._proc, self._fs)
            count = cg.oom_kill_count() if cg is not None else None
            rss = resident_bytes(pid, self._proc)
            # Counted before checking it is alive: a kill after this read shows as an increase.
            if not is_alive(pid, self._proc):
                t.alive = False
                continue
            if cg is not None:
                same = t.cgroup is not None and t.cgroup.name == cg.name
                t.oom_kills_earlier = t.oom_kills if same else None
                t.cgroup = cg
                t.oom_kills = count
            if rss is not None:
                t.rss_bytes = rss
        for pid, t in self._tracked.items():
            if pid not in seen:
                t.alive = False

    def _gather(self, exitcode: int | None) -> EngineDeath:
        evidence: list[ProcessEvidence] = []
        for t in self._tracked.values():
            after = t.cgroup.oom_kill_count() if t.cgroup is not None else None
            evidence.append(
                ProcessEvidence(
                    pid=t.pid,
                    name=t.name,
                    cgroup=t.cgroup.name if t.cgroup else None,
                    cgroup_limit_bytes=t.cgroup.limit_bytes() if t.cgroup else None,
                    oom_kills_before=t.oom_kills_before,
                    oom_kills_after=after,
                    rss_bytes=t.rss_bytes,
                )
            )
        records = read_kernel_log(self._kmsg, self._kmsg_start if self._kmsg_start is not None else -1)
        kills = oom_kills(records or [], self._tracked) if self._kmsg_start is not None else {}
        return EngineDeath(
            pid=self.pid,
            name=self.name,
            exitcode=exitcode,
            processes=tuple(sorted(evidence, key=lambda e: e.pid != self.pid)),
            kernel_kills=tuple(kills.values()),
            kernel_log_read=records is not None and self._kmsg_start is not None,
            remedies=self._remedies,
        )


def _copy(err: RbeeError) -> RbeeError:
    return RbeeError(err.code, err.message, err.details, err.suggestions)


def watch_processes(candidates: Sequence[Any]) -> list[tuple[int, str, Callable[[], int | None]]]:
    """(pid, name, exitcode getter) of multiprocessing Process objects that have started."""
    out = []
    for proc in candidates:
        pid = getattr(proc, "pid", None)
        if not isinstance(pid, int):
            continue

        def exitcode(p: Any = proc) -> int | None:
            try:
                return p.exitcode
            except ValueError:  # the process object was closed
                return None

        out.append((pid, str(getattr(proc, "name", "") or ""), exitcode))
    return out
