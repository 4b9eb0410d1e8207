"""One worker child process: its output captured line by line, its exit
watched (never polled), and its whole process tree stopped on request.

The child leads its own process group, so the engine's own subprocesses are
reached through the group even after the leader has exited. On Linux the
child also gets SIGTERM should the hive die without stopping it (see launch.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from rbee_hive.workers.oom import kernel_log_mark, killed_by_oom

log = logging.getLogger(__name__)

TAIL_LINES = 40


@dataclass(frozen=True)
class ExitInfo:
    returncode: int
    # Seconds between the start and the exit.
    runtime_s: float
    # Stopped by the hive (shutdown, health, idle, SIGTERM cascade).
    requested: bool
    oom_killed: bool = False

    @property
    def signal_name(self) -> str | None:
        if self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return None

    def describe(self) -> str:
        if self.oom_killed:
            return "killed by the kernel's OOM killer (out of memory)"
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exited with code {self.returncode}"


LineSink = Callable[[str], None]


class WorkerProcess:
    def __init__(
        self, popen: subprocess.Popen, reader: asyncio.StreamReader, started: float, on_line: LineSink, kernel_mark: int = -1
    ) -> None:
        self._popen = popen
        # The kernel log's newest record at the start: only kills after it are this worker's.
        self._kernel_mark = kernel_mark
        self._reader = reader
        self.pid = popen.pid
        self.started = started
        self._on_line = on_line
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._stop_requested = False
        self._exit: ExitInfo | None = None
        self._known: dict[int, psutil.Process] = {}
        self._remember_tree()
        self._pump = asyncio.create_task(self._read_output(), name=f"worker-output-{self.pid}")
        self._waiter = asyncio.create_task(self._wait(), name=f"worker-exit-{self.pid}")

    @classmethod
    async def start(
        cls,
        program: Path,
        args: Sequence[str],
        env: Mapping[str, str],
        on_line: LineSink,
        cwd: Path | None = None,
    ) -> "WorkerProcess":
        # Through the launcher on Linux, so the worker gets SIGTERM if the hive dies.
        launcher = [sys.executable, "-m", "rbee_hive.workers.launch"] if sys.platform == "linux" else []
        mark = await asyncio.to_thread(kernel_log_mark)
        # Popen rather than asyncio's subprocess: there, wait() only returns once
        # every holder of the output pipe has closed it, and an engine subprocess
        # that outlives a killed worker holds it. The exit is watched on its own.
        popen = subprocess.Popen(
            [*launcher, str(program), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1024 * 1024, loop=loop)
        assert popen.stdout is not None
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), popen.stdout)
        return cls(popen, reader, time.monotonic(), on_line, mark)

    # -- output -----------------------------------------------------------
    async def _read_output(self) -> None:
        stream = self._reader
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what is there
                raw = await stream.read(64 * 1024)
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._tail.append(line)
            try:
                self._on_line(line)
            except Exception:  # noqa: BLE001 - a sink must not stop the capture
                log.exception("worker output sink failed")

    def tail(self, n: int = 15) -> list[str]:
        return list(self._tail)[-n:]

    # -- exit ---------------------------------------------------------------
    async def _exited(self) -> int:
        """The exit status, awaited on a pidfd (Linux) or in a thread elsewhere."""
        pidfd_open = getattr(os, "pidfd_open", None)
        fd = None
        if pidfd_open is not None:
            try:
                fd = pidfd_open(self.pid)
            except OSError:  # already reaped or not supported by the kernel
                fd = None
        if fd is None:
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(fd, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self._popen.wait()

    async def _wait(self) -> ExitInfo:
        code = await self._exited()
        # Read what is left in the pipe so the last lines are in the log.
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), timeout=2)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        runtime = time.monotonic() - self.started
        oom = code == -signal.SIGKILL and not self._stop_requested and await asyncio.to_thread(
            killed_by_oom, self.pid, self._kernel_mark
        )
        self._exit = ExitInfo(code, runtime, self._stop_requested, oom)
        # Anything the worker left in its group goes with it.
        self._signal_tree(signal.SIGKILL)
        return self._exit

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._waiter)

    @property
    def exit_info(self) -> ExitInfo | None:
        return self._exit

    @property
    def running(self) -> bool:
        return self._exit is None and self._popen.returncode is None

    async def wait_for_exit(self, timeout: float) -> ExitInfo | None:
        try:
            return await asyncio.wait_for(self.wait(), timeout=max(0.0, timeout))
        except asyncio.TimeoutError:
            return None

    # -- stopping -----------------------------------------------------------
    def _remember_tree(self) -> None:
        """Remember descendants now: once the leader is gone they cannot be found
        through it any more (the group still reaches those that kept it)."""
        try:
            leader = psutil.Process(self.pid)
            for p in [leader, *leader.children(recursive=True)]:
                self._known.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def _signal_tree(self, sig: int) -> None:
        self._remember_tree()
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, p in list(self._known.items()):
            try:
                if p.is_running():  # compares create time: never signals a reused pid
                    p.send_signal(sig)
                    if sig == signal.SIGTERM:
                        p.send_signal(signal.SIGCONT)  # a stopped process must run to see SIGTERM
                else:
                    del self._known[pid]
            except psutil.NoSuchProcess:
                self._known.pop(pid, None)
            except psutil.Error:
                pass

    def mark_stop_requested(self) -> None:
        self._stop_requested = True

    async def terminate(self, grace: float, kill_wait: float = 5.0) -> tuple[ExitInfo | None, bool]:
        """SIGTERM the tree, wait ``grace``, then SIGKILL. Returns (exit, force_killed)."""
        self._stop_requested = True
        if self.running:
            self._signal_tree(signal.SIGTERM)
            info = await self.wait_for_exit(grace)
            if info is not None:
                self._signal_tree(signal.SIGKILL)
                return info, False
        return await self.kill(kill_wait)

    async def kill(self, kill_wait: float = 5.0) -> tuple[ExitInfo | None, bool]:
        self._stop_requested = True
        forced = self.running
        self._signal_tree(signal.SIGKILL)
        info = await self.wait_for_exit(kill_wait)
        return info, forced

    def alive_tree(self) -> list[int]:
        """Pids of this worker's tree that still run (tests and diagnostics)."""
        self._remember_tree()
        alive = []
        for pid, p in self._known.items():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive
