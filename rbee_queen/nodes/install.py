"""`setup install --node NAME` (S3): rbee put on the node at its install_path
over the node's transport — clone or update the repository, then the project's
own setup script (a Python environment with the programs and the engine that
fits the node), then the hive program verified. Each step is narrated with its
duration; a failing step shows the remote command's exit status and last lines.
Running it again updates in place; with nothing changed the setup step is a
stamp check and the whole install takes seconds."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from rbee.errors import RbeeError

from rbee_queen.nodes.store import NodeRecord
from rbee_queen.nodes.transport import CommandResult, NodeTransport
from rbee_queen.nodes.validation import GIT_ALLOW_PROTOCOL, check_git_source

Narrate = Callable[..., None]


def _failed(record: NodeRecord, step: str, result: CommandResult, suggestions: list[str]) -> RbeeError:
    return RbeeError(
        "INSTALL_FAILED",
        f"Install on node {record.name} failed at step '{step}' (exit status {result.exit_status})",
        {"node": record.name, "step": step, "exit_status": result.exit_status, "output": result.tail() or "(no output)"},
        suggestions,
    )


class Installer:
    def __init__(self, transport: NodeTransport, record: NodeRecord, narrate: Narrate, step_timeout: float,
                 engine_site: str | None = None) -> None:  # fmt: skip
        self.t = transport
        self.record = record
        self.narrate = narrate
        self.step_timeout = step_timeout
        self.engine_site = engine_site

    async def _step(self, name: str, command: str, suggestions: list[str], timeout: float | None = None,
                    say_last_line: bool = False) -> CommandResult:  # fmt: skip
        self.narrate("📦", f"{name} …")
        started = time.monotonic()
        result = await self.t.run(command, timeout=timeout or self.step_timeout)
        took = time.monotonic() - started
        if not result.ok:
            self.narrate("❌", f"{name} failed after {took:.1f}s (exit status {result.exit_status})", "error")
            raise _failed(self.record, name, result, suggestions)
        last = result.tail(1).removeprefix("[setup] ").strip() if say_last_line else ""
        self.narrate("✅", f"{name} ({took:.1f}s)" + (f": {last}" if last else ""))
        return result

    async def run(self) -> str:
        """Install or update; returns the installed hive's version line."""
        r = self.record
        path = shlex.quote(r.install_path)
        started = time.monotonic()
        self.narrate("🐝", f"Installing rbee on {r.name} ({self.t.target}) at {r.install_path}")
        # Checked again here: a registry of an older version stored sources
        # unchecked. Then `--` before every positional argument and git held
        # to the allowed transports, so no value can read as an option or
        # reach for a remote helper (docs/security.md, "Commands on nodes").
        check_git_source(r.git_repo_url, r.git_branch or "main", r.name)
        await self._step(
            "Checking git and python3",
            "command -v git >/dev/null || { echo 'git is not installed'; exit 1; }; "
            "command -v python3 >/dev/null || { echo 'python3 is not installed'; exit 1; }; "
            "python3 -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' "
            "|| { echo \"python3 is $(python3 --version 2>&1); rbee needs 3.11+ with venv\"; exit 1; }",
            ["Install git and Python 3.11+ with venv on the node (e.g. `apt-get install git python3-venv`)"],
            timeout=60,
        )
        if not r.git_repo_url:
            raise RbeeError(
                "INSTALL_FAILED",
                f"Node {r.name} has no git repository to install from",
                {"node": r.name},
                [f"Set one with `rbee-keeper setup update-node --name {r.name} --git-repo URL`"],
            )
        # `--` before every positional argument, git held to the allowed transports.
        repo, branch = shlex.quote(r.git_repo_url), shlex.quote(r.git_branch or "main")
        git = f"env GIT_ALLOW_PROTOCOL={GIT_ALLOW_PROTOCOL} GIT_TERMINAL_PROMPT=0 git"
        await self._step(
            f"Fetching {r.git_repo_url} ({r.git_branch or 'main'})",
            f"if [ -d {path}/.git ]; then "
            f"{git} -C {path} fetch --quiet -- {repo} {branch} && {git} -C {path} checkout --quiet -B {branch} FETCH_HEAD --; "
            f"elif [ -e {path} ] && [ -n \"$(ls -A -- {path} 2>/dev/null)\" ]; then "
            f"echo 'the install path exists and is not a git checkout'; exit 1; "
            f"else mkdir -p -- \"$(dirname -- {path})\" && {git} clone --quiet --branch {branch} -- {repo} {path}; fi "
            f"&& {git} -C {path} log -1 --format='%h %s' --",
            [f"Check the repository and branch with `rbee-keeper setup update-node --name {r.name} --git-repo URL --git-branch BRANCH`",
             "A local change in the node's checkout blocks the update: commit or discard it there"],  # fmt: skip
            timeout=600,
        )
        env = "RBEE_SETUP_DEV=0"
        if self.engine_site:
            env += f" RBEE_ENGINE_SITE={shlex.quote(self.engine_site)}"
        await self._step(
            "Setting up the Python environment and the engine (scripts/setup.sh)",
            f"cd {path} && env {env} PYTHON=python3 bash scripts/setup.sh 2>&1",
            ["Read the output above; `pip` on the node must reach its package index"],
            say_last_line=True,
        )
        version = await self._step(
            "Verifying the hive program",
            f"{shlex.quote(r.hive_program)} --version",
            [f"Run `rbee-keeper setup install --node {r.name}` again; if it fails the same way, check {r.install_path}/.venv"],
            timeout=60,
        )
        line = version.stdout.strip().splitlines()[-1] if version.stdout.strip() else ""
        self.narrate("🎉", f"rbee installed on {r.name}: {line} in {time.monotonic() - started:.1f}s")
        return line
