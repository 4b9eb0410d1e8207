"""Blocking helpers for the task-flow features (S1, S6.2, S8 queen side).

A ``TaskWorld`` is a ``QueenWorld`` whose queens hand their environment to
the hives they start: the stand-in worker program (``RBEE_HIVE_WORKER_BINARY``,
the real worker contract without an engine), the hub-like server as the
model hub (``HF_ENDPOINT``) and short heartbeats. Nodes are this machine
(``setup add-node --local``), each with its own RBEE_HOME and hive port, so
every process a scenario starts can be found again by that folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from features.steps.queen_support import KeeperRun, QueenWorld
from tests.fixtures.hive import STANDIN_MODULE, free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives, node_hive_pids
from tests.hubserver import HubServer

T = TypeVar("T")

MODEL_REPO = "rbee-test/tiny"
MODEL_REF = f"hf:{MODEL_REPO}"
MODEL_FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 3_000_000, "tokenizer.json": b"{}"}
# What the stand-in worker answers to every prompt.
# The stand-in worker's fake engine answers token k as "t{k} " (tests/unit/worker/fakes.py): 3 tokens.
STANDIN_TEXT = "t1 t2 t3 "
POLL_TIMEOUT_S = 30.0


@dataclass
class LocalNode:
    name: str
    home: Path
    port: int


@dataclass
class TaskWorld(QueenWorld):
    hub: HubServer | None = None
    # What every queen of the scenario (and so every hive it starts) gets.
    env: dict[str, str] = field(default_factory=dict)
    local_nodes: dict[str, LocalNode] = field(default_factory=dict)
    # The worker a cold start spawned, as the queen listed it, and the hub's
    # body requests once it was done.
    worker: dict[str, Any] | None = None
    downloads: int = 0
    # Pids seen before a step, to tell new processes from old ones.
    before: dict[str, list[int]] = field(default_factory=dict)
    queen_settings: dict[str, str] = field(default_factory=dict)
    queen_exit: int | None = None
    # The hive pids of a node right after an infer on it; when a hive was stopped (SIGSTOP).
    hives_after_infer: dict[str, list[int]] = field(default_factory=dict)
    stopped_at: float = 0.0
    # What an HTTP scenario keeps between its steps (port, responses, streams).
    http: dict[str, Any] = field(default_factory=dict)

    def prepare(self, hub: HubServer, **extra: str) -> None:
        self.hub = hub
        program = write_standin_program(self.tmp / "standin")
        self.env = hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s",
                            STANDIN_LOAD_S="0.3", **extra)  # fmt: skip

    def serve_model(self) -> None:
        assert self.hub is not None
        self.hub.add_repo(MODEL_REPO, MODEL_FILES)

    def start_queen(self, name: str = "q", **env: str) -> QueenProc:  # type: ignore[override]
        """A queen (``queen-rbee daemon``) whose RBEE_HOME is ``<tmp>/<name>/queen-home``:
        a queen started again under the same name finds the same node registry."""
        self.queen_settings = {**self.env, **env}
        self.queen = self.run(self.queen_factory(name=name, **self.queen_settings))
        return self.queen

    def restart_queen(self, name: str) -> QueenProc:
        """Another queen on the registry in ``name``, with the settings of the
        last one (queen_factory stops every queen it started at the end)."""
        self.queen = self.run(self.queen_factory(name=name, **self.queen_settings))
        return self.queen

    def local(self, name: str) -> LocalNode:
        if name not in self.local_nodes:
            self.local_nodes[name] = LocalNode(name, self.tmp / f"node-{name}", free_port_block(1))
        return self.local_nodes[name]

    def add_local_nodes(self, *names: str) -> None:
        """``setup add-node --local`` for each name (the keepers run at once)."""
        commands = []
        for name in names:
            node = self.local(name)
            commands.append(["setup", "add-node", "--name", name, "--local", "--rbee-home", str(node.home),
                             "--hive-port", str(node.port)])  # fmt: skip
        for run in self.keepers(*commands):
            assert run.code == 0, run

    def infer(self, node: str, model: str = MODEL_REF, *extra: str) -> KeeperRun:
        return self.keeper("infer", "--node", node, "--model", model, "--prompt", "hi", "--max-tokens", "3", *extra)

    def keeper_direct(self, *args: str) -> KeeperRun:
        """A keeper command that talks to a hive or worker itself (no --queen)."""
        assert self.queen is not None
        started = time.monotonic()
        code, out, err = self.run(self.queen.keeper(*args, queen=False, timeout=120))
        return KeeperRun(args, code, out, err, time.monotonic() - started)

    def keeper_without_queen(self, address: str, *args: str) -> KeeperRun:
        """A keeper command against ``address`` where no queen answers; the
        keeper's environment carries what the queen it starts hands its hives."""
        assert self.queen is not None
        started = time.monotonic()
        code, out, err = self.run(self.queen.keeper(*args, "--queen", address, queen=False, timeout=300, **self.env))
        self.last = KeeperRun((*args, "--queen", address), code, out, err, time.monotonic() - started)
        return self.last

    def cluster(self, *args: str) -> list[dict[str, Any]]:
        run = self.keeper("workers", "list", "--json", *args)
        assert run.code == 0, run
        return [json.loads(line) for line in run.out.splitlines()]

    def until(self, probe: Callable[[], T], timeout: float = POLL_TIMEOUT_S, step: float = 0.2) -> T:
        """``probe()`` until it returns something truthy (or the time is up: the last value)."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(step)

    def hive_pids(self, name: str) -> list[int]:
        return [pid for pid in node_hive_pids(self.local(name).home) if _alive(pid)]

    def worker_pids(self, name: str) -> list[int]:
        """Live stand-in worker processes spawned by the hive of node ``name``."""
        home = str(self.local(name).home)
        return [p.pid for p in _procs() if _is_worker(p.info["cmdline"] or [], home) and _alive(p.pid)]

    def processes_of(self, name: str) -> list[tuple[int, list[str]]]:
        """Every live process with node ``name``'s RBEE_HOME in its command line."""
        home = str(self.local(name).home)
        return [(p.pid, p.info["cmdline"]) for p in _procs() if any(home in c for c in p.info["cmdline"] or []) and _alive(p.pid)]

    def queen_pids(self, port: int) -> list[int]:
        """Live queen-rbee processes listening on ``port`` (by their command line)."""
        found = []
        for p in _procs():
            cmd = p.info["cmdline"] or []
            if any(c.endswith("queen-rbee") for c in cmd[:2]) and "--port" in cmd and cmd[cmd.index("--port") + 1 :][:1] == [str(port)]:
                if _alive(p.pid):
                    found.append(p.pid)
        return found

    def close(self) -> None:
        super().close()
        for node in self.local_nodes.values():
            kill_node_hives(node.home)
            for p in _procs():
                if _is_worker(p.info["cmdline"] or [], str(node.home)):
                    with contextlib.suppress(psutil.Error):
                        p.kill()


def _procs():
    return psutil.process_iter(["cmdline"])


def _is_worker(cmd: list[str], home: str) -> bool:
    return any(STANDIN_MODULE in c for c in cmd) and any(home in c for c in cmd)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_process(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def resume_process(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


# The fixtures every queen-task step module uses: import them into the module
# (``from features.steps.queen_task_support import session_loop, world``).
@pytest.fixture(scope="module")
async def session_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.fixture
def world(session_loop, queen_factory, hub, tmp_path):
    # No node here installs rbee from a repository: the "repo" is never read.
    state = TaskWorld(session_loop, tmp_path, queen_factory, repo=tmp_path)
    state.prepare(hub)
    yield state
    state.close()
