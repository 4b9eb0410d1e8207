"""The seam between the queen and a node: run a command there, write a file
there, start a program there that outlives the connection.

Two implementations: ``SshTransport`` (asyncssh, the normal case) and
``LocalTransport`` (a node that is the queen's own machine, `setup add-node
--local`). The rest of the queen talks to a ``NodeTransport`` and never knows
which one it has: install, preflight and hive start are the same steps.

Commands are POSIX shell text run by ``sh -c`` on the node (the login shell's
``sh`` over SSH), so callers quote with ``shlex.quote``.
"""

from __future__ import annotations

import abc
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from rbee.errors import RbeeError

# narrate(emoji, message, level="info")
Narrate = Callable[..., object]

DEFAULT_COMMAND_TIMEOUT_S = 60.0
# Lines of a failed command's output shown to the user.
OUTPUT_TAIL_LINES = 20


def _quiet(*_args: object, **_kw: object) -> None:
    return None


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def tail(self, lines: int = OUTPUT_TAIL_LINES) -> str:
        """The last lines of what the command printed (stderr after stdout)."""
        text = "\n".join(part.rstrip("\n") for part in (self.stdout, self.stderr) if part.strip())
        return "\n".join(text.splitlines()[-lines:])


class NodeTransport(abc.ABC):
    """How the queen reaches one node."""

    #: "ssh" or "local"; shown in narration.
    kind: str = ""

    def __init__(self, node_name: str, narrate: Narrate | None = None) -> None:
        self.node_name = node_name
        self.narrate: Narrate = narrate or _quiet

    @property
    @abc.abstractmethod
    def target(self) -> str:
        """Where the node is, for messages: ``user@host:port`` or ``this machine``."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the link (SSH: retries, host key check, auth), narrating each attempt.

        Raises RbeeError: SSH_CONNECTION_FAILED, SSH_AUTH_FAILED,
        SSH_HOST_KEY_UNKNOWN, SSH_HOST_KEY_CHANGED, SSH_KEY_NOT_FOUND."""

    @abc.abstractmethod
    async def run(self, command: str, *, input: str | None = None, timeout: float = DEFAULT_COMMAND_TIMEOUT_S) -> CommandResult:
        """Run ``command`` with ``sh -c`` on the node and wait for it.

        ``input`` is written to its stdin (then closed). A command still
        running after ``timeout`` seconds is ended and raises RbeeError
        DEADLINE_EXCEEDED. A lost link raises SSH_CONNECTION_FAILED."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the link (idempotent)."""

    async def __aenter__(self) -> "NodeTransport":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- built on run(): the same on every transport ----------------------------------------

    async def check(self, command: str, what: str, *, input: str | None = None,
                    timeout: float = DEFAULT_COMMAND_TIMEOUT_S, code: str = "SSH_COMMAND_FAILED") -> CommandResult:
        """run(), raising ``code`` with the exit status and output tail on failure."""
        result = await self.run(command, input=input, timeout=timeout)
        if not result.ok:
            raise RbeeError(
                code,
                f"{what} failed on node {self.node_name} (exit status {result.exit_status})",
                {"node": self.node_name, "exit_status": result.exit_status, "output": result.tail() or "(no output)"},
            )
        return result

    async def write_file(self, path: str, data: str, mode: int = 0o600) -> None:
        """Write ``data`` to ``path`` on the node, created with ``mode`` (never
        readable by others in between: the umask covers the creation)."""
        umask = 0o777 & ~mode
        folder = path.rsplit("/", 1)[0] or "/"
        cmd = (
            f"(umask 077 && mkdir -p {shlex.quote(folder)}) && umask {umask:03o} && "
            f"cat > {shlex.quote(path)}.tmp && chmod {mode:o} {shlex.quote(path)}.tmp && "
            f"mv -f {shlex.quote(path)}.tmp {shlex.quote(path)}"
        )
        await self.check(cmd, f"Writing {path}", input=data)

    async def start_detached(self, command: str, log_path: str, cwd: str | None = None) -> int:
        """Start ``command`` in its own session, outliving this link, with its
        output appended to ``log_path``; returns its pid on the node."""
        folder = log_path.rsplit("/", 1)[0] or "/"
        inner = f"cd {shlex.quote(cwd)} && exec {command}" if cwd else f"exec {command}"
        # The braces keep `&` to the program alone: a backgrounded `a && b`
        # list would be a subshell holding the session's output open (OpenSSH
        # then waits for it) and $! would name that subshell.
        cmd = (
            f"mkdir -p {shlex.quote(folder)} && "
            f"{{ setsid sh -c {shlex.quote(inner)} >> {shlex.quote(log_path)} 2>&1 < /dev/null & echo $!; }}"
        )
        result = await self.check(cmd, "Starting a background program")
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    async def round_trip(self, samples: int = 3) -> float:
        """Seconds for ``echo test`` to come back (the best of ``samples``: the
        first run also pays for warming the link); SSH_COMMAND_FAILED if it
        does not say ``test``."""
        best = float("inf")
        for _ in range(samples):
            started = time.monotonic()
            result = await self.run("echo test", timeout=30)
            best = min(best, time.monotonic() - started)
            if not result.ok or result.stdout.strip() != "test":
                break
        elapsed = best
        if not result.ok or result.stdout.strip() != "test":
            raise RbeeError(
                "SSH_COMMAND_FAILED",
                f"`echo test` on node {self.node_name} did not answer `test`",
                {"node": self.node_name, "exit_status": result.exit_status, "output": result.tail() or "(no output)"},
                ["Check the login shell of the node's user (it must run `sh -c` commands)"],
            )
        return elapsed
