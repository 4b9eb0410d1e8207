"""Blocking helpers for the queen's step modules (S3, S4.1, S4.2 queen side).

pytest-bdd steps are plain functions, but the asyncssh test server lives in
the session's event loop and serves only while that loop runs. So a scenario
drives everything through ``QueenWorld.run``: the keeper's process is awaited
on that same loop (``QueenProc.keeper``), and the in-process SSH server answers
the queen meanwhile. OpenSSH's sshd, the queen and the hives are processes of
their own.

``install_rbee(loop, repo, dest)`` puts rbee at ``dest`` with the queen's own
Installer over a LocalTransport: the steps `setup install` runs on a node,
without SSH, for scenarios whose node "has rbee installed" already.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_queen.nodes.install import Installer
from rbee_queen.nodes.local import LocalTransport
from rbee_queen.nodes.store import NodeRecord
from tests.fixtures.hive import free_port_block
from tests.fixtures.ports import free_port
from tests.fixtures.queen import QueenProc, engine_site, kill_node_hives
from tests.fixtures.ssh import SshNodeBase

INSTALL_STEP_TIMEOUT_S = 600.0
KEEPER_TIMEOUT_S = 300.0


@dataclass
class KeeperRun:
    args: tuple[str, ...]
    code: int
    out: str
    err: str
    seconds: float

    def __str__(self) -> str:
        return f"rbee-keeper {' '.join(self.args)} → exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"

    def narrated_in_order(self, *needles: str) -> None:
        """Each needle appears in stderr after the previous one."""
        at = 0
        for needle in needles:
            found = self.err.find(needle, at)
            assert found >= 0, f"{needle!r} not narrated after position {at}:\n{self}"
            at = found + len(needle)

    def suggestions(self) -> list[str]:
        return [line.strip()[2:] for line in self.err.splitlines() if line.strip().startswith("→ ")]


def install_rbee(loop: asyncio.AbstractEventLoop, repo: Path, dest: Path) -> list[str]:
    """rbee installed at ``dest`` from ``repo`` the way `setup install` does it
    on a node (the engine shared from this checkout's .venv); the narration."""
    lines: list[str] = []
    record = NodeRecord(name="prepared", transport="local", install_path=str(dest), hive_key="-", git_repo_url=str(repo))
    installer = Installer(
        LocalTransport(record.name), record, lambda _emoji, message, level="info": lines.append(message),
        INSTALL_STEP_TIMEOUT_S, engine_site(),
    )  # fmt: skip
    loop.run_until_complete(installer.run())
    return lines


@dataclass
class QueenWorld:
    """One scenario: a queen, at most one SSH node, the last keeper run."""

    loop: asyncio.AbstractEventLoop
    tmp: Path
    queen_factory: Callable[..., Coroutine[Any, Any, QueenProc]]
    repo: Path
    queen: QueenProc | None = None
    node: SshNodeBase | None = None
    # Where rbee is (or will be) on the node; the node's RBEE_HOME and hive port.
    install_path: Path | None = None
    node_home: Path = field(init=False)
    hive_port: int = field(init=False)
    last: KeeperRun | None = None
    known_hosts_before: str | None = None
    old_fingerprint: str = ""
    port: int = 0
    missing_key: Path | None = None
    hive_pid: int = 0
    runs: list[KeeperRun] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node_home = self.tmp / "node-home"
        self.hive_port = free_port_block(1)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def start_queen(self, **env: str) -> QueenProc:
        self.queen = self.run(self.queen_factory(**env))
        return self.queen

    def keeper(self, *args: str, **env: str) -> KeeperRun:
        assert self.queen is not None, "no queen started"
        started = time.monotonic()
        code, out, err = self.run(self.queen.keeper(*args, timeout=KEEPER_TIMEOUT_S, **env))
        self.last = KeeperRun(args, code, out, err, time.monotonic() - started)
        return self.last

    def keepers(self, *commands: list[str]) -> list[KeeperRun]:
        """Several keeper commands at once (each its own process)."""
        assert self.queen is not None, "no queen started"
        started = time.monotonic()
        queen = self.queen

        async def together() -> list[tuple[int, str, str]]:
            # gather inside the loop: outside it, asyncio would look for a current loop.
            return await asyncio.gather(*(queen.keeper(*args, timeout=KEEPER_TIMEOUT_S) for args in commands))

        results = self.run(together())
        took = time.monotonic() - started
        return [KeeperRun(tuple(args), *result, took) for args, result in zip(commands, results)]

    @property
    def known_hosts(self) -> Path:
        assert self.queen is not None
        return self.queen.home / "known_hosts"

    def add_args(self, name: str, *, port: int | None = None, key: Path | None = None,
                 install_path: str | None = None) -> list[str]:  # fmt: skip
        node = self.node
        assert node is not None, "no SSH node in this scenario"
        path = install_path or str(self.install_path or self.tmp / "node" / "rbee")
        return [
            "setup", "add-node", "--name", name, "--ssh-host", node.host, "--ssh-port", str(port or node.port),
            "--ssh-user", node.user, "--ssh-key", str(key or node.key_path), "--git-repo", str(self.repo),
            "--install-path", path, "--rbee-home", str(self.node_home), "--hive-port", str(self.hive_port),
        ]  # fmt: skip

    def nodes(self) -> dict[str, dict]:
        run = self.keeper("setup", "list-nodes", "--json")
        assert run.code == 0, run
        return {n["name"]: n for n in map(json.loads, run.out.splitlines())}

    def closed_port(self) -> int:
        return free_port()

    def silent_listener(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        self.sockets.append(sock)
        return sock.getsockname()[1]

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        kill_node_hives(self.node_home)


def quoted(text: str) -> list[str]:
    """The "…" parts of a step's text."""
    return re.findall(r'"((?:[^"\\]|\\.)*)"', text)
