"""``EngineWatch``: follows vLLM's engine child and the processes it starts
while they live, and names the death once when the child ends.

While the engine lives it notes, every ``WATCH_INTERVAL_S``, each process's
pid and name, its memory cgroup (re-read: a process can be moved) with that
cgroup's OOM kill counter, and its resident memory (engine_procs.py), plus
the kernel log's sequence number at the start. When the child is gone it
gathers that evidence into an ``EngineDeath`` and ``classify``
(engine_death.py) turns it into the error the worker reports. Every path is a
parameter, so tests fake the kernel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.errors import RbeeError
from rbee.kernel_log import KMSG, last_kernel_seq, oom_kills, read_kernel_log
from rbee_worker.engine_death import EngineDeath, ProcessEvidence, Remedies, classify
from rbee_worker.engine_procs import (
    CGROUP_FS,
    PROC,
    MemoryCgroup,
    children_of,
    is_alive,
    memory_cgroup,
    process_name,
    resident_bytes,
)

log = logging.getLogger(__name__)

# How often the engine's processes are looked at while they live.
WATCH_INTERVAL_S = 0.5


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
