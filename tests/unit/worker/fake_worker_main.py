"""The real llm-worker-rbee program (flags, server, servicer, signals,
callback, exit codes, narration) with a FakeEngine instead of vLLM, for fast
process-level tests. Hives in tests run it as their worker program (the
"stand-in worker": tests/fixtures/hive.py write_standin_program), so the
contract they see is the worker's own and cannot drift from it.

Run: python -m tests.unit.worker.fake_worker_main <worker flags>

The engine (FakeEngine, tests/unit/worker/fakes.py):
  FAKE_ENGINE_MODE (fast|slow|gated|hang), FAKE_ENGINE_DELAY (s, slow mode),
  FAKE_ENGINE_LOAD_ERROR (message: loading fails with it),
  FAKE_ENGINE_DIE_AFTER (requests: health checks fail after that many),
  FAKE_ENGINE_DEATH (a code, e.g. ENGINE_OOM_KILLED: with FAKE_ENGINE_DIE_AFTER,
  the engine's processes "die" with it after that many requests, as VllmEngine reports),
  FAKE_ENGINE_HOLD_LOAD=1 (loading never finishes).

What a hive test needs of its workers (STANDIN_*: the names a test hive lets
through to its workers, tests/fixtures/hive.py confinement_env):
  STANDIN_LOAD_S=0.3          seconds the engine takes to load (default 0.3)
  STANDIN_FAIL_LOAD=1         loading fails (MODEL_LOAD_FAILED): FAILED, exit 1
  STANDIN_CHILD=1             the engine starts a child process, as vLLM's does
  STANDIN_PID_DIR=DIR         write <worker-id>.pid (and .child.pid) there
  STANDIN_OOM_CGROUP=DIR      while loading, join this memory cgroup and allocate
                              past its limit (the kernel's OOM killer ends it)
  STANDIN_TAKEN_PORTS=a,b     these ports are held by another process of ours
                              before the worker binds (so it exits 3, PORT_IN_USE)
  STANDIN_IGNORE_SHUTDOWN=1   a broken worker: Shutdown and SIGTERM are acknowledged
                              and ignored
  STANDIN_IGNORE_SHUTDOWN_FOR=TEXT  the same, only for model paths containing TEXT
  STANDIN_ENV_DUMP=DIR        write the environment it was started with to
                              DIR/<worker-id>.env.json
  STANDIN_COUNT_DIR=DIR       add a line to DIR/<worker-id>.requests for each
                              request the engine takes (the worker's own count)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from rbee.errors import RbeeError
from rbee_worker import program
from rbee_worker.engine import EngineInfo, LoadProgress, ProgressCallback
from rbee_worker.program import main
from rbee_worker.settings import Settings
from tests.unit.worker.fakes import STAGES, FakeEngine



class ProgramEngine(FakeEngine):
    """FakeEngine with what a worker process's engine has: time to load, a
    child process, memory, a pid on disk."""

    def __init__(self, settings: Settings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.load_s = float(os.environ.get("STANDIN_LOAD_S", "0.3"))
        self.child: subprocess.Popen | None = None
        # Made with the engine, before the server answers: the hive's first
        # sight of the worker (loading) already has the child.
        if os.environ.get("STANDIN_CHILD") == "1":
            self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        pid_dir = os.environ.get("STANDIN_PID_DIR")
        if pid_dir:
            Path(pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(pid_dir) / f"{settings.worker_id}.pid").write_text(str(os.getpid()))
            if self.child is not None:
                (Path(pid_dir) / f"{settings.worker_id}.child.pid").write_text(str(self.child.pid))

    async def load(self, progress: ProgressCallback) -> EngineInfo:
        # FakeEngine's stages up to the weights at once (as FakeEngine does),
        # then the weights take their time; FakeEngine.load finishes (or holds).
        for i, stage in enumerate(STAGES[:-1]):
            progress(LoadProgress(stage, i, len(STAGES), f"fake {stage}"))
        oom_cgroup = os.environ.get("STANDIN_OOM_CGROUP")
        if oom_cgroup:
            (Path(oom_cgroup) / "cgroup.procs").write_text(str(os.getpid()))
            self.hog = b"\x01" * (512 * 1024 * 1024)  # touching the memory is the point
        if self.load_s > 0:
            await asyncio.sleep(self.load_s)  # the pretend weights loading, not a wait for a condition
        return await super().load(progress)

    def generate(self, request_id: str, prompt_token_ids: list[int], options):
        count_dir = os.environ.get("STANDIN_COUNT_DIR")
        if count_dir:
            with open(Path(count_dir) / f"{self.settings.worker_id}.requests", "a") as counted:
                counted.write("1\n")
        return super().generate(request_id, prompt_token_ids, options)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.child is not None:
            self.child.terminate()
            self.child.wait()


def fake_engine(settings: Settings) -> FakeEngine:
    error = os.environ.get("FAKE_ENGINE_LOAD_ERROR")
    if os.environ.get("STANDIN_FAIL_LOAD") == "1":
        error = f"Cannot load {settings.model_path}: no weights found"
    die_after = os.environ.get("FAKE_ENGINE_DIE_AFTER")
    death = os.environ.get("FAKE_ENGINE_DEATH")
    return ProgramEngine(
        settings,
        mode=os.environ.get("FAKE_ENGINE_MODE", "fast"),
        delay=float(os.environ.get("FAKE_ENGINE_DELAY", "0.01")),
        max_model_len=settings.max_model_len,
        load_error=RbeeError("MODEL_LOAD_FAILED", error, {"model_path": settings.model_path}) if error else None,
        die_after_requests=int(die_after) if die_after else None,
        death=RbeeError(death, f"fake engine process {death}", {"pid": "4242"}, ["Give the worker fewer slots"]) if death else None,
        hold_load=os.environ.get("FAKE_ENGINE_HOLD_LOAD") == "1",
    )


def _flag(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


def _ignore_shutdown(argv: list[str]) -> bool:
    only_for = os.environ.get("STANDIN_IGNORE_SHUTDOWN_FOR")
    return os.environ.get("STANDIN_IGNORE_SHUTDOWN") == "1" or bool(only_for and only_for in _flag(argv, "--model"))


def _hold_taken_ports(argv: list[str]) -> list[socket.socket]:
    """Bind the listed ports first (as another process would), so the worker's
    own bind meets a taken port."""
    port = _flag(argv, "--port")
    taken = {p.strip() for p in os.environ.get("STANDIN_TAKEN_PORTS", "").split(",") if p.strip()}
    held = []
    if port in taken:
        s = socket.socket()
        s.bind((_flag(argv, "--host") or "127.0.0.1", int(port)))
        s.listen()
        held.append(s)
    return held


def run(argv: list[str]) -> int:
    dump_dir = os.environ.get("STANDIN_ENV_DUMP")
    if dump_dir:
        (Path(dump_dir) / f"{_flag(argv, '--worker-id') or 'worker'}.env.json").write_text(json.dumps(dict(os.environ), sort_keys=True))
    if _ignore_shutdown(argv):

        def ignore(self, timeout_s: float) -> None:
            self.narrate("🙉", "Shutdown requested; ignoring it (a worker that ignores shutdown)")

        program.Worker.request_shutdown = ignore
    held = _hold_taken_ports(argv)
    try:
        return main(argv, engine_factory=fake_engine)
    finally:
        for s in held:
            s.close()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
