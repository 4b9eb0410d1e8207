"""Host keys of the nodes the queen reaches over SSH (rbee_queen/nodes/ssh.py).

The key the server presents is compared with the entries for the node in the
known_hosts files the queen passes (its own ``$RBEE_HOME/known_hosts`` and
the user's ``~/.ssh/known_hosts``):

* an entry holds that key → accepted;
* no entry names the node → refused (``SSH_HOST_KEY_UNKNOWN``) unless the user
  explicitly trusts new keys (``--trust-host-key``), in which case the key is
  appended to the record file once the server has proved it holds it;
* entries name the node but hold other keys → refused
  (``SSH_HOST_KEY_CHANGED``), trusted or not: a recorded key is never replaced
  silently.

The decision is the pure function ``decide_host_key``; ``HostKeyCheck`` asks
it for one connection attempt (asyncssh calls it from
``SSHClient.validate_host_public_key``: every key goes there because the
connection's own trusted list is empty) and turns a refusal into its error.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from rbee.errors import RbeeError

if TYPE_CHECKING:
    from rbee_queen.nodes.ssh import SshTransport

SSH_DEFAULT_PORT = 22


# -- keys and known_hosts files --------------------------------------------------------------


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


def host_key_algorithms(recorded: Sequence[RecordedHostKey]) -> list[str]:
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


# -- one connection attempt ------------------------------------------------------------------


class HostKeyCheck:
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

    def refused(self, exc: asyncssh.HostKeyNotVerifiable) -> RbeeError:
        """The error for a host key this attempt refused."""
        t = self.transport
        if self.error is not None:
            return self.error
        where = known_hosts_name(t.host, t.port)
        details: dict[str, object] = {"node": t.node_name, "host": t.host, "port": t.port}
        d = self.decision
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
                {**details, "known_hosts": ", ".join(str(p) for p in t.known_hosts_files)},
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
