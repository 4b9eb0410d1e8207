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

``EngineWatch`` (engine_watch.py) follows the engine's processes while they
live (pids, their memory cgroup, which can change, its counter, their
resident memory; read by engine_procs.py) and gathers that evidence into an
``EngineDeath`` the moment the engine child ends; ``classify`` here turns it
into the error the worker reports.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from rbee.errors import RbeeError
from rbee.kernel_log import OomKill

MIB = 1024 * 1024

OOM_CODE = "ENGINE_OOM_KILLED"
DIED_CODE = "ENGINE_DIED"


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
