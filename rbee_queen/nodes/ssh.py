"""``SshTransport``: the queen reaches a node over SSH (asyncssh).

Authentication is by one private key only (the node's ``ssh_key_path``): no
agent, no password, no default keys, no ``~/.ssh/config``.

Host keys are always verified. The key the server presents is compared with
the entries for the node in the known_hosts files the queen passes (its own
``$RBEE_HOME/known_hosts`` and the user's ``~/.ssh/known_hosts``):

* an entry holds that key → accepted;
* no entry names the node → refused (``SSH_HOST_KEY_UNKNOWN``) unless the user
  explicitly trusts new keys (``--trust-host-key``), in which case the key is
  appended to the record file once the server has proved it holds it;
* entries name the node but hold other keys → refused
  (``SSH_HOST_KEY_CHANGED``), trusted or not: a recorded key is never replaced
  silently.

The decision is the pure function ``decide_host_key``; asyncssh asks it through
``SSHClient.validate_host_public_key`` (every key goes there because the
connection's own trusted list is empty).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from rbee.errors import RbeeError
from rbee.retry import backoff_delays
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
SSH_DEFAULT_PORT = 22


# -- host keys: pure --------------------------------------------------------------------------


@dataclass(frozen=True)
class HostKey:
    """A public host key: its algorithm name and its SSH wire-format blob."""

    algorithm: str
    blob: bytes

    @classmethod
    def from_openssh(cls, text: str) -> "HostKey":
        """From ``ALGORITHM BASE64 [comment]``."""
        fields = text.split()
        if len(fields) < 2:
            raise ValueError("expected 'ALGORITHM BASE64'")
        return cls(fields[0], base64.b64decode(fields[1], validate=True))

    @classmethod
    def from_asyncssh(cls, key: asyncssh.SSHKey) -> "HostKey":
        return cls(key.algorithm.decode("ascii"), bytes(key.public_data))

    @property
    def fingerprint(self) -> str:
        """OpenSSH's form: ``SHA256:`` and the unpadded base64 of the blob's SHA-256."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def openssh(self) -> str:
        """``ALGORITHM BASE64``, as in a known_hosts line after the host name."""
        return f"{self.algorithm} {base64.b64encode(self.blob).decode('ascii')}"

    def describe(self) -> str:
        return f"{self.algorithm} {self.fingerprint}"


@dataclass(frozen=True)
class RecordedHostKey:
    """A known_hosts entry for the node and the file that holds it."""

    key: HostKey
    file: Path


class HostKeyVerdict(enum.Enum):
    KNOWN = "known"  # a recorded entry holds the presented key
    TRUST_NEW = "trust_new"  # nothing recorded, the user trusts new keys: accept and record
    UNKNOWN = "unknown"  # nothing recorded: refuse
    CHANGED = "changed"  # recorded entries hold other keys: refuse
    REVOKED = "revoked"  # the presented key is marked @revoked: refuse


@dataclass(frozen=True)
class HostKeyDecision:
    verdict: HostKeyVerdict
    presented: HostKey
    #: KNOWN: the matching entry; CHANGED: the entry reported (same algorithm
    #: first); REVOKED: the @revoked entry; otherwise None.
    recorded: RecordedHostKey | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict in (HostKeyVerdict.KNOWN, HostKeyVerdict.TRUST_NEW)


def decide_host_key(
    presented: HostKey,
    recorded: Sequence[RecordedHostKey],
    *,
    trust_new: bool = False,
    revoked: Sequence[RecordedHostKey] = (),
) -> HostKeyDecision:
    """Known, unknown (trusted or not) or changed: what to do with a server's host key.

    ``recorded`` holds every known_hosts entry for this host and port, from
    every file; ``trust_new`` accepts a key only when no entry names the host.
    """
    for entry in revoked:
        if entry.key == presented:
            return HostKeyDecision(HostKeyVerdict.REVOKED, presented, entry)
    for entry in recorded:
        if entry.key == presented:
            return HostKeyDecision(HostKeyVerdict.KNOWN, presented, entry)
    if not recorded:
        verdict = HostKeyVerdict.TRUST_NEW if trust_new else HostKeyVerdict.UNKNOWN
        return HostKeyDecision(verdict, presented)
    same_kind = [entry for entry in recorded if entry.key.algorithm == presented.algorithm]
    return HostKeyDecision(HostKeyVerdict.CHANGED, presented, (same_kind or list(recorded))[0])


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a host: ``host`` on port 22, ``[host]:port`` elsewhere."""
    return host if port == SSH_DEFAULT_PORT else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, key: HostKey) -> str:
    return f"{known_hosts_name(host, port)} {key.openssh()}"


def read_recorded_host_keys(
    files: Sequence[Path], host: str, port: int
) -> tuple[list[RecordedHostKey], list[RecordedHostKey]]:
    """The entries (and @revoked entries) naming ``host``:``port`` in ``files``.

    Missing files are skipped. Like OpenSSH, an entry for a non-22 port must be
    ``[host]:port`` (a bare ``host`` entry is for port 22 only); hashed names,
    patterns and negations are understood. An existing file that cannot be
    read raises SSH_HOST_KEY_UNKNOWN (the key cannot be checked against it).
    """
    name = known_hosts_name(host, port)
    recorded: list[RecordedHostKey] = []
    revoked: list[RecordedHostKey] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise RbeeError(
                "SSH_HOST_KEY_UNKNOWN",
                f"Cannot read the known_hosts file {path}: {exc.strerror or exc}",
                {"host": host, "port": port, "known_hosts": str(path)},
                [f"Check that {path} is readable by the queen's user"],
            ) from None
        # An address as the name lets asyncssh also match address patterns;
        # port=None keeps it from falling back to the port-less entry.
        host_keys, _ca_keys, revoked_keys, *_x509 = asyncssh.import_known_hosts(text).match(name, "", None)
        recorded += [RecordedHostKey(HostKey.from_asyncssh(k), path) for k in host_keys]
        revoked += [RecordedHostKey(HostKey.from_asyncssh(k), path) for k in revoked_keys]
    return recorded, revoked


def append_known_host(path: Path, line: str) -> None:
    """Append ``line`` to a known_hosts file, creating it 0600 (its folder 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        needs_newline = os.fstat(fd).st_size > 0 and not _ends_with_newline(path)
        os.write(fd, (("\n" if needs_newline else "") + line.rstrip("\n") + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


# -- the transport -------------------------------------------------------------------------------


class _HostKeyCheck:
    """One connection attempt's host key verification (called from asyncssh's callbacks)."""

    def __init__(self, transport: "SshTransport") -> None:
        self.transport = transport
        self.decision: HostKeyDecision | None = None
        self.error: RbeeError | None = None
        self.recorded_new = False

    def validate(self, key: asyncssh.SSHKey) -> bool:
        t = self.transport
        presented = HostKey.from_asyncssh(key)
        if self.decision is not None and self.decision.accepted and self.decision.presented == presented:
            return True  # the same key again (a re-key)
        try:
            recorded, revoked = read_recorded_host_keys(t.known_hosts_files, t.host, t.port)
        except RbeeError as exc:
            self.error = exc
            return False
        self.decision = decide_host_key(presented, recorded, trust_new=t.trust_host_key, revoked=revoked)
        return self.decision.accepted

    def server_proved_key(self) -> None:
        """Key exchange is complete: the server holds the key's private half. Record a newly trusted key."""
        t = self.transport
        d = self.decision
        if d is None or d.verdict is not HostKeyVerdict.TRUST_NEW or self.recorded_new:
            return
        append_known_host(t.record_known_hosts, known_hosts_line(t.host, t.port, d.presented))
        self.recorded_new = True
        t.narrate(
            "🔑",
            f"Trusted the new host key of {known_hosts_name(t.host, t.port)} ({d.presented.describe()}) "
            f"and recorded it in {t.record_known_hosts}",
            level="warn",
        )


class _Client(asyncssh.SSHClient):
    def __init__(self, check: _HostKeyCheck) -> None:
        self._check = check
        self.lost = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self._check.validate(key)

    def begin_auth(self, username: str) -> None:
        self._check.server_proved_key()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _host_key_algorithms(recorded: Sequence[RecordedHostKey]) -> list[str]:
    """Plain public key algorithms (no certificates), those of recorded keys first,
    so that a server with several host keys presents the one we know."""
    from asyncssh.public_key import get_default_public_key_algs

    preferred: list[bytes] = []
    for entry in recorded:
        try:
            key = asyncssh.import_public_key(entry.key.openssh())
        except (asyncssh.KeyImportError, ValueError):
            continue
        preferred += [alg for alg in key.sig_algorithms if alg not in preferred]
    algs = preferred + [alg for alg in get_default_public_key_algs() if alg not in preferred]
    return [alg.decode("ascii") for alg in algs]


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
            check = _HostKeyCheck(self)
            try:
                await self._connect_once(key, check)
                return
            except asyncssh.PermissionDenied:
                raise self._auth_failed() from None
            except asyncssh.HostKeyNotVerifiable as exc:
                raise self._host_key_refused(check, exc) from None
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

    async def _connect_once(self, key: asyncssh.SSHKey, check: _HostKeyCheck) -> None:
        recorded, _revoked = read_recorded_host_keys(self.known_hosts_files, self.host, self.port)
        client = _Client(check)
        conn = await asyncssh.connect(
            self.host,
            self.port,
            username=self.user,
            client_factory=lambda: client,
            # Nothing trusted up front: every host key goes to validate_host_public_key.
            known_hosts=([], [], []),
            server_host_key_algs=_host_key_algorithms(recorded),
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

    def _host_key_refused(self, check: _HostKeyCheck, exc: asyncssh.HostKeyNotVerifiable) -> RbeeError:
        if check.error is not None:
            return check.error
        where = known_hosts_name(self.host, self.port)
        details: dict[str, object] = {"node": self.node_name, "host": self.host, "port": self.port}
        d = check.decision
        if d is None:
            return RbeeError(
                "SSH_HOST_KEY_UNKNOWN",
                f"The SSH host key of {where} could not be verified: {exc.reason}",
                details,
                ["Check the node's sshd host keys (rbee accepts plain ssh-ed25519, ecdsa and rsa keys)"],
            )
        details.update(key_type=d.presented.algorithm, fingerprint=d.presented.fingerprint)
        if d.verdict is HostKeyVerdict.UNKNOWN:
            return RbeeError(
                "SSH_HOST_KEY_UNKNOWN",
                f"The SSH host key of {where} is not known: {d.presented.describe()}",
                {**details, "known_hosts": ", ".join(str(p) for p in self.known_hosts_files)},
                [
                    "Check the fingerprint on the node itself (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)",
                    "Re-run the command with --trust-host-key after checking the fingerprint "
                    "(e.g. rbee-keeper setup add-node ... --trust-host-key)",
                ],
            )
        assert d.recorded is not None
        old = d.recorded
        if d.verdict is HostKeyVerdict.REVOKED:
            return RbeeError(
                "SSH_HOST_KEY_CHANGED",
                f"The SSH host key {d.presented.describe()} presented by {where} is marked @revoked in {old.file}",
                {**details, "known_hosts_file": str(old.file)},
                ["Ask the node's administrator for the node's current host key"],
            )
        return RbeeError(
            "SSH_HOST_KEY_CHANGED",
            f"The SSH host key of {where} has changed: recorded {old.key.describe()} in {old.file}, "
            f"presented {d.presented.describe()}",
            {
                **details,
                "recorded_key_type": old.key.algorithm,
                "recorded_fingerprint": old.key.fingerprint,
                "known_hosts_file": str(old.file),
            },
            [
                "Someone may be intercepting the connection; a reinstalled node also changes its key. "
                "Check the fingerprint on the node itself (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)",
                f"If the new key is right, remove the old line with: ssh-keygen -R '{where}' -f {old.file} "
                "and re-run the command with --trust-host-key",
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
