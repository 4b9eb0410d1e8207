"""SshTransport against real SSH servers on 127.0.0.1 (asyncssh's, and OpenSSH's sshd)."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rbee.errors import RbeeError
from rbee_queen.nodes.ssh import SshTransport
from tests.fixtures.ports import free_port
from tests.fixtures.ssh import AsyncsshNode, SshdNode, SshNodeBase

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Narration:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, emoji: str, message: str, level: str = "info") -> None:
        self.events.append((emoji, message, level))

    @property
    def attempts(self) -> list[str]:
        return [m for e, m, _ in self.events if e == "🔌"]

    @property
    def warnings(self) -> list[str]:
        return [m for _, m, level in self.events if level == "warn"]


@pytest.fixture
def narration() -> Narration:
    return Narration()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "rbee-home"


def transport(node: SshNodeBase | None, home: Path, narration: Narration, **kw: Any) -> SshTransport:
    args: dict[str, Any] = dict(
        node_name="n1",
        host=node.host if node else "127.0.0.1",
        port=node.port if node else 22,
        user=node.user if node else "root",
        key_path=node.key_path if node else home / "no-key",
        known_hosts=[home / "known_hosts", home / "user-known_hosts"],
        record_known_hosts=home / "known_hosts",
        connect_timeout=2.0,
        narrate=narration,
    )
    args.update(kw)
    return SshTransport(**args)


async def expect_error(t: SshTransport, code: str) -> RbeeError:
    with pytest.raises(RbeeError) as err:
        await t.connect()
    await t.close()
    assert err.value.code == code, err.value
    return err.value


@pytest.fixture
async def connected(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> AsyncIterator[SshTransport]:
    asyncssh_node.write_known_hosts(home / "known_hosts")
    t = transport(asyncssh_node, home, narration)
    await t.connect()
    try:
        yield t
    finally:
        await t.close()


# -- commands ----------------------------------------------------------------------------------


async def test_runs_commands(connected: SshTransport, narration: Narration, asyncssh_node: AsyncsshNode) -> None:
    assert connected.kind == "ssh"
    assert connected.target == f"{asyncssh_node.user}@127.0.0.1:{asyncssh_node.port}"
    assert narration.attempts == [f"Connecting to {connected.target} (attempt 1/3)"]
    result = await connected.run("echo test")
    assert (result.exit_status, result.stdout, result.stderr) == (0, "test\n", "")
    result = await connected.run("echo oops >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "", "oops\n")
    assert not result.ok
    # stdin: given, then closed; absent: the command sees an empty stdin (no hang).
    result = await connected.run("tr a-z A-Z", input="hello\nworld\n")
    assert result.stdout == "HELLO\nWORLD\n"
    result = await connected.run("cat; echo done", timeout=5)
    assert result.stdout == "done\n"
    assert await connected.round_trip() < 5
    # The helpers built on run() work over SSH too.
    target = Path(connected.record_known_hosts).parent / "written" / "file.txt"
    await connected.write_file(str(target), "secret\n")
    assert target.read_text() == "secret\n" and stat.S_IMODE(target.stat().st_mode) == 0o600


async def test_command_timeout_is_deadline_exceeded(connected: SshTransport) -> None:
    started = time.monotonic()
    with pytest.raises(RbeeError) as err:
        await connected.run("sleep 5; echo late", timeout=0.5)
    assert time.monotonic() - started < 3
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert "sleep 5; echo late" in err.value.message and "0.5 s" in err.value.message
    assert err.value.details["command"] == "sleep 5; echo late"
    long = "echo " + "x" * 200 + "; sleep 5"
    with pytest.raises(RbeeError) as err:
        await connected.run(long, timeout=0.2)
    assert err.value.details["command"] == long[:80] and long[:81] not in err.value.message
    # The link is still usable afterwards.
    assert (await connected.run("echo test")).stdout == "test\n"


async def test_lost_connection_during_a_command(connected: SshTransport, asyncssh_node: AsyncsshNode) -> None:
    task = asyncio.ensure_future(connected.run("sleep 5", timeout=10))
    await asyncio.sleep(0.3)
    asyncssh_node.drop_connections()
    with pytest.raises(RbeeError) as err:
        await asyncio.wait_for(task, 5)
    assert err.value.code == "SSH_CONNECTION_FAILED"
    assert "lost" in err.value.message and "sleep 5" in err.value.message
    with pytest.raises(RbeeError) as err:
        await connected.run("echo test")
    assert err.value.code == "SSH_CONNECTION_FAILED"


async def test_close_is_idempotent(connected: SshTransport) -> None:
    await connected.close()
    await connected.close()
    with pytest.raises(RbeeError) as err:
        await connected.run("echo test")
    assert err.value.code == "SSH_CONNECTION_FAILED"


# -- connection failures -----------------------------------------------------------------------


async def test_silent_listener_times_out_three_times(home: Path, narration: Narration) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept, never speak SSH

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = transport(None, home, narration, port=port, key_path=_any_key(home), connect_timeout=0.3)
    started = time.monotonic()
    try:
        err = await expect_error(t, "SSH_CONNECTION_FAILED")
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    elapsed = time.monotonic() - started
    target = f"root@127.0.0.1:{port}"
    assert err.message.startswith(f"SSH connection to {target} failed after 3 attempts: timed out")
    assert err.details["attempts"] == "3" and err.details["port"] == str(port) and err.details["host"] == "127.0.0.1"
    assert "timed out after 0.3 s" in err.details["last_error"]
    assert any("sshd" in s for s in err.suggestions)
    assert len(accepted) == 3
    assert narration.attempts == [f"Connecting to {target} (attempt {i}/3)" for i in (1, 2, 3)]
    assert len(narration.warnings) == 3 and all("timed out" in w for w in narration.warnings)
    # 3 × 0.3 s plus ~200 + ~400 ms of backoff (±20 %).
    assert 0.9 + 0.45 < elapsed < 4


async def test_closed_port_is_refused_three_times(home: Path, narration: Narration) -> None:
    port = free_port()
    t = transport(None, home, narration, port=port, key_path=_any_key(home), connect_timeout=0.5)
    err = await expect_error(t, "SSH_CONNECTION_FAILED")
    assert f"127.0.0.1:{port} failed after 3 attempts: connection refused" in err.message
    assert err.details["last_error"] == "connection refused"
    assert len(narration.attempts) == 3 and len(narration.warnings) == 3
    assert "attempt 3/3" in narration.attempts[-1]


async def test_attempts_are_configurable(home: Path, narration: Narration) -> None:
    port = free_port()
    t = transport(None, home, narration, port=port, key_path=_any_key(home), attempts=1)
    err = await expect_error(t, "SSH_CONNECTION_FAILED")
    assert "failed after 1 attempts" in err.message and narration.attempts[-1].endswith("(attempt 1/1)")


async def test_wrong_key_fails_auth_without_retry(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    asyncssh_node.write_known_hosts(home / "known_hosts")
    t = transport(asyncssh_node, home, narration, key_path=asyncssh_node.wrong_key_path)
    err = await expect_error(t, "SSH_AUTH_FAILED")
    assert "127.0.0.1" in err.message and asyncssh_node.user in err.message
    assert str(asyncssh_node.wrong_key_path) in err.message
    assert err.details["key_path"] == str(asyncssh_node.wrong_key_path) and err.details["user"] == asyncssh_node.user
    assert any("authorized_keys" in s for s in err.suggestions)
    assert any(f"chmod 600 {asyncssh_node.wrong_key_path}" in s for s in err.suggestions)
    assert len(narration.attempts) == 1


async def test_other_user_fails_auth(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    asyncssh_node.write_known_hosts(home / "known_hosts")
    t = transport(asyncssh_node, home, narration, user="somebody-else")
    err = await expect_error(t, "SSH_AUTH_FAILED")
    assert "somebody-else" in err.message
    assert asyncssh_node.auth_attempts == ["somebody-else"]  # only the one key was offered


async def test_missing_key_file_fails_before_connecting(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    missing = home / "nope" / "id_ed25519"
    t = transport(asyncssh_node, home, narration, key_path=missing)
    err = await expect_error(t, "SSH_KEY_NOT_FOUND")
    assert err.message == f"SSH key not found: {missing}"
    assert narration.events == [] and asyncssh_node.connections == set()


async def test_encrypted_key_is_refused_before_connecting(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    path = home / "encrypted"
    home.mkdir(parents=True, exist_ok=True)
    path.write_bytes(asyncssh_node.keys.client_key.export_private_key("pkcs8-pem", passphrase="pw"))
    err = await expect_error(transport(asyncssh_node, home, narration, key_path=path), "SSH_KEY_NOT_FOUND")
    assert err.message == f"SSH key {path} cannot be used: it is protected by a passphrase"
    assert narration.attempts == []


# -- host keys ---------------------------------------------------------------------------------


async def test_unknown_host_key_then_trusted_then_recorded(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    fp = asyncssh_node.host_key_fingerprint
    where = f"[127.0.0.1]:{asyncssh_node.port}"
    err = await expect_error(transport(asyncssh_node, home, narration), "SSH_HOST_KEY_UNKNOWN")
    assert where in err.message and "ssh-ed25519" in err.message and fp in err.message
    assert err.details["fingerprint"] == fp and err.details["key_type"] == "ssh-ed25519"
    assert any("--trust-host-key after checking the fingerprint" in s for s in err.suggestions)
    assert len(narration.attempts) == 1  # not retried
    assert not (home / "known_hosts").exists()
    assert asyncssh_node.auth_attempts == []  # refused before authenticating

    trusted = transport(asyncssh_node, home, narration, trust_host_key=True)
    await trusted.connect()
    try:
        assert (await trusted.run("echo test")).stdout == "test\n"
    finally:
        await trusted.close()
    record = home / "known_hosts"
    assert record.read_text() == asyncssh_node.known_hosts_line + "\n"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert any(fp in m and str(record) in m for e, m, _ in narration.events if e == "🔑")

    again = transport(asyncssh_node, home, narration)
    await again.connect()
    await again.close()
    # Known now: trusting again does not add a second line.
    again = transport(asyncssh_node, home, narration, trust_host_key=True)
    await again.connect()
    await again.close()
    assert record.read_text() == asyncssh_node.known_hosts_line + "\n"


async def test_key_in_the_users_known_hosts_is_accepted(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    asyncssh_node.write_known_hosts(home / "user-known_hosts")
    t = transport(asyncssh_node, home, narration)
    await t.connect()
    await t.close()
    assert not (home / "known_hosts").exists()


async def test_changed_host_key_is_refused_even_when_trusting(asyncssh_node: AsyncsshNode, home: Path, narration: Narration) -> None:
    record = asyncssh_node.write_known_hosts(home / "known_hosts")
    old_fp = asyncssh_node.host_key_fingerprint
    before = record.read_text()
    await asyncssh_node.change_host_key()
    new_fp = asyncssh_node.host_key_fingerprint
    assert new_fp != old_fp
    where = f"[127.0.0.1]:{asyncssh_node.port}"
    for trust in (False, True):
        err = await expect_error(transport(asyncssh_node, home, narration, trust_host_key=trust), "SSH_HOST_KEY_CHANGED")
        assert where in err.message and old_fp in err.message and new_fp in err.message and str(record) in err.message
        assert err.details["recorded_fingerprint"] == old_fp and err.details["fingerprint"] == new_fp
        assert err.details["known_hosts_file"] == str(record)
        assert any(f"ssh-keygen -R '{where}' -f {record}" in s for s in err.suggestions)
        assert record.read_text() == before
    assert len(narration.attempts) == 2  # one per connect: not retried
    assert asyncssh_node.auth_attempts == []


# -- OpenSSH -------------------------------------------------------------------------------------


async def test_real_openssh_server(sshd_node: SshdNode, home: Path, narration: Narration) -> None:
    err = await expect_error(transport(sshd_node, home, narration), "SSH_HOST_KEY_UNKNOWN")
    assert sshd_node.host_key_fingerprint in err.message
    t = transport(sshd_node, home, narration, trust_host_key=True)
    try:
        await t.connect()
        result = await t.run("echo test")
        assert (result.exit_status, result.stdout) == (0, "test\n"), sshd_node.log()
        assert (await t.run("exit 3")).exit_status == 3
        assert (await t.run("cat", input="over stdin\n")).stdout == "over stdin\n"
        with pytest.raises(RbeeError) as deadline:
            await t.run("sleep 2", timeout=0.3)
        assert deadline.value.code == "DEADLINE_EXCEEDED"
    finally:
        await t.close()
    assert (home / "known_hosts").read_text() == sshd_node.known_hosts_line + "\n"
    t = transport(sshd_node, home, narration)
    await t.connect()
    try:
        assert (await t.run("echo test")).stdout == "test\n"
    finally:
        await t.close()
    await expect_error(transport(sshd_node, home, narration, key_path=sshd_node.wrong_key_path), "SSH_AUTH_FAILED")


def _any_key(home: Path) -> Path:
    """A readable private key for tests that never get as far as authenticating."""
    import asyncssh

    home.mkdir(parents=True, exist_ok=True)
    path = home / "id_ed25519"
    if not path.exists():
        path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh"))
        path.chmod(0o600)
    return path

