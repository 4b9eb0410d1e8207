"""Workers a dead hive left behind.

The registry and the workers' keys live in the hive's memory, so a hive that
died (SIGKILL, OOM, power) cannot adopt its old workers: they are stopped
instead. The kernel sends each worker SIGTERM when its hive dies (launch.py);
this ledger covers the worker that ignores it or hangs. Each running worker
has a file ``$RBEE_HOME/run/<worker-id>.pid`` (its pid and start time, and
its hive's); it goes when the worker exits. A hive that starts and finds
files of a hive that is no longer running stops the process groups they
name, if the very same process (pid and start time) is still running, so a
recycled pid is never hit and a live hive's workers are never touched.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from rbee.paths import confined, private_dir

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class Leftover:
    worker_id: str
    pid: int
    stopped: bool


class WorkerLedger:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, worker_id: str) -> Path:
        return confined(self.folder, f"{worker_id}.pid", what="Worker pid file")

    def record(self, worker_id: str, pid: int) -> None:
        try:
            started = psutil.Process(pid).create_time()
            hive = psutil.Process()
            hive_pid, hive_started = hive.pid, hive.create_time()
        except psutil.Error:
            return  # already gone: nothing to leave behind
        try:
            private_dir(self.folder)
            path = self._path(worker_id)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{pid} {started!r} {hive_pid} {hive_started!r}\n")
        except OSError as exc:
            log.warning("cannot record worker %s (pid %s): %s", worker_id, pid, exc)

    def forget(self, worker_id: str) -> None:
        try:
            self._path(worker_id).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot forget worker %s: %s", worker_id, exc)

    def reap(self, narrate: Callable[..., object]) -> list[Leftover]:
        """Stop what a previous hive left running; clear the ledger."""
        if not self.folder.is_dir():
            return []
        found: list[Leftover] = []
        for path in sorted(self.folder.glob("*.pid")):
            worker_id = path.name.removesuffix(".pid")
            try:
                pid_text, started_text, hive_pid_text, hive_started_text = path.read_text().split()
                pid, started = int(pid_text), float(started_text)
                hive_pid, hive_started = int(hive_pid_text), float(hive_started_text)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if _is_running(hive_pid, hive_started):
                continue  # another hive on this RBEE_HOME, alive: its workers are its own
            stopped = _stop_if_same(pid, started)
            if stopped:
                narrate("🧹", f"Stopped {worker_id} (pid {pid}), left running by a hive that did not stop cleanly", "warn")
            found.append(Leftover(worker_id, pid, stopped))
            path.unlink(missing_ok=True)
        return found


def _is_running(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) <= 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_if_same(pid: int, started: float) -> bool:
    """SIGKILL the process group led by ``pid`` if ``pid`` is still the process
    recorded (same start time). True when something was stopped."""
    if not _is_running(pid, started):
        return False
    try:
        proc = psutil.Process(pid)
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)  # a worker leads its own process group (its engine is in it)
    except OSError:
        pass
    for member in members:
        try:
            member.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(members, timeout=KILL_WAIT_S)
    return True
