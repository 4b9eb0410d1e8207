"""``SshTransport``: the queen reaches a node over SSH (asyncssh).

Authentication is by one private key only (the node's ``ssh_key_path``): no
agent, no password, no default keys, no ``~/.ssh/config``.

Host keys are always verified against the known_hosts files the queen passes
(rbee_queen/nodes/host_keys.py: known, unknown unless trusted, changed).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from rbee.errors import RbeeError
from rbee.retry import backoff_delays
from rbee_queen.nodes.host_keys import HostKeyCheck, host_key_algorithms, read_recorded_host_keys
from rbee_queen.nodes.transport import DEFAULT_COMMAND_TIMEOUT_S, CommandResult, Narrate, NodeTransport

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_ATTEMPTS = 3
# Backoff before attempt 2, 3, …: 200 ms, 400 ms, … (jittered); attempt 1 is immediate.
BACKOFF_BASE_MS = 200
# A dead link is noticed within interval × count seconds while a command runs.
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_COUNT_MAX = 4
# How much of a command is quoted in messages.
COMMAND_SHOWN_CHARS = 80


class _Client(asyncssh.SSHClient):
    def __init__(self, check: HostKeyCheck) -> None:
        self._check = check
        self.lost = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self._check.validate(key)

    def begin_auth(self, username: str) -> None:
        self._check.server_proved_key()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _describe_connect_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _retry_delays(attempts: int) -> list[float]:
    """Seconds to wait before each attempt: 0, then ~200 ms, ~400 ms, … (jittered)."""
    return [0.0, *backoff_delays(BACKOFF_BASE_MS, attempts)]


class SshTransport(NodeTransport):
    """A node reached over SSH with one key, host key verified."""

    kind = "ssh"

    def __init__(
        self,
        node_name: str,
        host: str,
        port: int,
        user: str,
        key_path: Path,
        *,
        known_hosts: Sequence[Path],
        record_known_hosts: Path,
        trust_host_key: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        narrate: Narrate | None = None,
    ) -> None:
        super().__init__(node_name, narrate)
        self.host = host
        self.port = int(port)
        self.user = user
        self.key_path = Path(key_path).expanduser()
        self.record_known_hosts = Path(record_known_hosts).expanduser()
        files = [Path(p).expanduser() for p in known_hosts]
        if self.record_known_hosts not in files:
            files.append(self.record_known_hosts)
        self.known_hosts_files: list[Path] = files
        self.trust_host_key = trust_host_key
        self.connect_timeout = connect_timeout
        self.attempts = max(1, int(attempts))
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    # -- connect ----------------------------------------------------------------------------

    def _load_key(self) -> asyncssh.SSHKey:
        path = self.key_path
        if not path.is_file():
            raise RbeeError(
                "SSH_KEY_NOT_FOUND",
                f"SSH key not found: {path}",
                {"key_path": str(path), "node": self.node_name},
                ["Pass the path of an existing private key (e.g. ~/.ssh/id_ed25519) with --ssh-key"],
            )
        try:
            key = asyncssh.read_private_key(str(path))
        except OSError as exc:
            raise RbeeError(
                "SSH_KEY_NOT_FOUND",
                f"SSH key not found: {path} (cannot read it: {exc.strerror or exc})",
                {"key_path": str(path), "node": self.node_name},
                [f"Check that the queen's user can read {path}"],
            ) from None
        except asyncssh.KeyImportError as exc:
            encrypted = "passphrase" in str(exc).lower()
            reason = "it is protected by a passphrase" if encrypted else f"it is not a private key asyncssh can read ({exc})"
            raise RbeeError(
                "SSH_KEY_NOT_FOUND",
                f"SSH key {path} cannot be used: {reason}",
                {"key_path": str(path), "node": self.node_name},
                ["Use a private key without a passphrase made for rbee: ssh-keygen -t ed25519 -N '' -f ~/.ssh/rbee_ed25519"],
            ) from None
        if path.stat().st_mode & 0o077:
            self.narrate("⚠️", f"SSH key {path} is readable by other users; fix it with: chmod 600 {path}", level="warn")
        return key

    async def connect(self) -> None:
        if self._conn is not None:
            return
        key = self._load_key()
        last_reason = "no attempt made"
        for attempt, delay in enumerate(_retry_delays(self.attempts), start=1):
            if delay:
                await asyncio.sleep(delay)
            self.narrate("🔌", f"Connecting to {self.target} (attempt {attempt}/{self.attempts})")
            check = HostKeyCheck(self)
            try:
                await self._connect_once(key, check)
                return
            except asyncssh.PermissionDenied:
                raise self._auth_failed() from None
            except asyncssh.HostKeyNotVerifiable as exc:
                raise check.refused(exc) from None
            except (OSError, asyncio.TimeoutError, asyncssh.Error, ValueError) as exc:
                if check.error is not None:  # a known_hosts file could not be read
                    raise check.error from None
                last_reason = _describe_connect_error(exc, self.connect_timeout)
                self.narrate("⚠️", f"SSH attempt {attempt}/{self.attempts} to {self.target} failed: {last_reason}", level="warn")
        raise RbeeError(
            "SSH_CONNECTION_FAILED",
            f"SSH connection to {self.target} failed after {self.attempts} attempts: {last_reason}",
            {"node": self.node_name, "host": self.host, "port": self.port, "attempts": self.attempts, "last_error": last_reason},
            [
                f"Check that {self.host} is the right host name or address and that it is up",
                f"Check that sshd runs on {self.host} and listens on port {self.port} (e.g. `systemctl status ssh` on the node)",
                "Check that no firewall blocks the port",
            ],
        )

    async def _connect_once(self, key: asyncssh.SSHKey, check: HostKeyCheck) -> None:
        recorded, _revoked = read_recorded_host_keys(self.known_hosts_files, self.host, self.port)
        client = _Client(check)
        conn = await asyncssh.connect(
            self.host,
            self.port,
            username=self.user,
            client_factory=lambda: client,
            # Nothing trusted up front: every host key goes to validate_host_public_key.
            known_hosts=([], [], []),
            server_host_key_algs=host_key_algorithms(recorded),
            x509_trusted_certs=None,
            config=[],
            client_keys=[key],
            agent_path=None,
            password=None,
            preferred_auth="publickey",
            public_key_auth=True,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_host=None,
            connect_timeout=self.connect_timeout,
            keepalive_interval=KEEPALIVE_INTERVAL_S,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
        )
        self._conn = conn
        self._client = client

    def _auth_failed(self) -> RbeeError:
        return RbeeError(
            "SSH_AUTH_FAILED",
            f"SSH authentication to {self.host} as {self.user} with key {self.key_path} failed",
            {"node": self.node_name, "host": self.host, "port": self.port, "user": self.user, "key_path": str(self.key_path)},
            [
                f"Check that the public key ({self.key_path}.pub) is in ~{self.user}/.ssh/authorized_keys on {self.host}",
                f"Check that the key file's permissions are 600: chmod 600 {self.key_path}",
            ],
        )

    # -- run / close ------------------------------------------------------------------------

    def _lost(self, command: str, reason: str) -> RbeeError:
        return RbeeError(
            "SSH_CONNECTION_FAILED",
            f"SSH connection to {self.target} lost while running `{command[:COMMAND_SHOWN_CHARS]}`: {reason}",
            {"node": self.node_name, "host": self.host, "port": self.port, "command": command[:COMMAND_SHOWN_CHARS],
             "last_error": reason},
            [f"Check that {self.host} is up and reachable, then retry"],
        )

    async def run(self, command: str, *, input: str | None = None, timeout: float = DEFAULT_COMMAND_TIMEOUT_S) -> CommandResult:
        """See NodeTransport.run. The node's sshd runs ``command`` with the
        user's login shell (``$SHELL -c``). On timeout the command is sent
        SIGTERM and its channel closed; OpenSSH delivers that signal only to
        non-root logins (for root it logs "session signalling requires
        privilege separation"), so there a command that neither reads nor
        writes keeps running on the node until it ends by itself."""
        conn = self._conn
        if conn is None or (self._client is not None and self._client.lost):
            raise self._lost(command, "not connected")
        stdin_kw: dict[str, object] = {"input": input} if input else {"stdin": asyncssh.DEVNULL}
        try:
            process = await conn.create_process(command, encoding="utf-8", errors="replace", **stdin_kw)
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(command, _describe_connect_error(exc, timeout)) from None
        try:
            done = await process.wait(check=False, timeout=timeout)
        except asyncssh.TimeoutError:
            for end in (process.terminate, process.close):
                try:
                    end()
                except (OSError, asyncssh.Error):
                    pass
            shown = command[:COMMAND_SHOWN_CHARS]
            raise RbeeError(
                "DEADLINE_EXCEEDED",
                f"Command on node {self.node_name} still running after {timeout:g} s: `{shown}`",
                {"node": self.node_name, "command": shown, "timeout_s": f"{timeout:g}"},
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(command, _describe_connect_error(exc, timeout)) from None
        status = done.returncode
        if status is None:
            if self._client is not None and self._client.lost:
                raise self._lost(command, "connection closed")
            status = 255  # the channel closed without an exit status (as OpenSSH's ssh reports it)
        elif status < 0:
            status = 128 - status  # killed by a signal: the shell's convention
        return CommandResult(status, str(done.stdout or ""), str(done.stderr or ""))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._client = None
        if conn is None:
            return
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            pass
