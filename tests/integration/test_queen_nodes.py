"""queen-rbee and `rbee-keeper setup …` as users run them: a real queen
process, the keeper's console script, nodes reached locally or over an SSH
server on 127.0.0.1 (asyncssh's, running each command for real)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat

import pytest

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.ports import free_port
from tests.fixtures.queen import QueenProc

pytestmark = pytest.mark.asyncio(loop_scope="session")


def add_args(node, name: str = "n1", *extra: str, key=None) -> list[str]:
    return [
        "setup", "add-node", "--name", name, "--ssh-host", node.host, "--ssh-port", str(node.port),
        "--ssh-user", node.user, "--ssh-key", str(key or node.key_path), "--install-path", "/opt/rbee-test-none", *extra,
    ]  # fmt: skip


async def nodes(queen: QueenProc) -> list[dict]:
    code, out, err = await queen.keeper("setup", "list-nodes", "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_queen_key_is_generated_private_and_found_by_a_local_keeper(queen: QueenProc) -> None:
    key_file = queen.home / "queen.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(queen.home.stat().st_mode) == 0o700
    assert (queen.home / "logs" / "queen.log").is_file()
    db = queen.home / "beehives.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    code, out, err = await queen.keeper("setup", "list-nodes")
    assert code == 0, err
    assert out == "" and "No nodes registered" in err
    key = key_file.read_text().strip()
    assert key not in queen.text() and key not in (queen.home / "logs" / "queen.log").read_text()


async def test_wrong_queen_key_is_refused_with_the_key_source(queen: QueenProc) -> None:
    code, out, err = await queen.keeper("setup", "list-nodes", "--api-key", "not-the-key")
    assert code == 1 and out == ""
    assert "INVALID_API_KEY" in err and queen.address in err and "--api-key" in err
    assert "not-the-key" not in err and "Traceback" not in err


async def test_no_queen_answering(tmp_path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), "setup", "list-nodes", "--queen", f"127.0.0.1:{port}", "--api-key", "k",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=proc_env(RBEE_HOME=str(tmp_path)),
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1
    assert f"CONNECTION_TIMEOUT: Cannot reach the queen at 127.0.0.1:{port} after 3 attempts" in err.decode()
    assert "queen-rbee daemon" in err.decode()


async def test_local_node_add_list_duplicate_update_remove(queen: QueenProc, tmp_path) -> None:
    node_home = tmp_path / "node-home"
    code, out, err = await queen.keeper("setup", "add-node", "--name", "here", "--local", "--rbee-home", str(node_home),
                                        "--hive-port", "17999", "--json")  # fmt: skip
    assert code == 0, err
    saved = json.loads(out)
    assert saved["connection"] == "local" and saved["status"] == "reachable"
    assert saved["backends"] == {"cpu": 1} and saved["hive_version"] == "0.1.0"
    assert "Round-trip latency" in err and "Detected on here: cpu (1 device)" in err

    code, out, err = await queen.keeper("setup", "add-node", "--name", "here", "--local")
    assert code == 1 and "NODE_EXISTS" in err
    assert "rbee-keeper setup update-node --name here" in err and "rbee-keeper setup remove-node --name here" in err

    code, out, err = await queen.keeper("setup", "list-nodes")
    assert code == 0 and "here" in out and "(this machine)" in out and "reachable" in out

    code, out, err = await queen.keeper("setup", "update-node", "--name", "here", "--hive-port", "17998", "--json")
    assert code == 0, err
    assert json.loads(out)["hive_port"] == 17998

    code, out, err = await queen.keeper("setup", "update-node", "--name", "here", "--ssh-host", "127.0.0.1")
    assert code == 1 and "INVALID_ARGUMENT" in err and "local" in err

    code, out, err = await queen.keeper("setup", "remove-node", "--name", "here")
    assert code == 0, err
    assert "Nothing stopped on here: this queen did not start its hive" in err
    assert await nodes(queen) == []


@pytest.mark.parametrize("command", [["setup", "install", "--node", "ghost"], ["setup", "check-node", "--name", "ghost"],
                                     ["setup", "remove-node", "--name", "ghost"], ["setup", "update-node", "--name", "ghost", "--hive-port", "1"]])  # fmt: skip
async def test_unknown_node(queen: QueenProc, command: list[str]) -> None:
    code, out, err = await queen.keeper(*command)
    assert code == 1 and out == ""
    assert "NODE_NOT_FOUND" in err and "'ghost'" in err
    assert "rbee-keeper setup add-node --name ghost" in err


async def test_missing_ssh_key_is_caught_by_the_keeper_before_sending(queen: QueenProc, asyncssh_node, tmp_path) -> None:
    missing = tmp_path / "no-such-key"
    code, out, err = await queen.keeper(*add_args(asyncssh_node, key=missing))
    assert code == 1
    assert f"SSH_KEY_NOT_FOUND: SSH key not found: {missing}" in err
    assert asyncssh_node.auth_attempts == [] and "Connecting" not in err
    assert "Testing the connection" not in queen.text()


async def test_unknown_host_key_is_refused_then_trusted_and_recorded(queen: QueenProc, asyncssh_node) -> None:
    code, out, err = await queen.keeper(*add_args(asyncssh_node))
    assert code == 1, err
    assert "SSH_HOST_KEY_UNKNOWN" in err and asyncssh_node.host_key_fingerprint in err and "--trust-host-key" in err
    assert await nodes(queen) == []

    code, out, err = await queen.keeper(*add_args(asyncssh_node, "n1", "--trust-host-key", "--json"))
    assert code == 0, err
    assert json.loads(out)["status"] == "reachable"
    assert "SSH latency" in err and "rbee is not installed at /opt/rbee-test-none" in err
    recorded = (queen.home / "known_hosts").read_text()
    assert asyncssh_node.known_hosts_line.split()[-1] in recorded
    assert stat.S_IMODE((queen.home / "known_hosts").stat().st_mode) == 0o600

    # The next connection is verified against the record, no option needed;
    # the SSH preflight then stops at the missing hive program, with the fix.
    code, out, err = await queen.keeper("setup", "check-node", "--name", "n1", "--ssh-only")
    assert code == 1
    assert "Command execution works" in err and "SSH latency" in err
    assert "HIVE_NOT_INSTALLED" in err and "command not found" in err
    assert "rbee-keeper setup install --node n1" in err


async def test_changed_host_key_is_refused_with_both_fingerprints(queen: QueenProc, asyncssh_node) -> None:
    asyncssh_node.write_known_hosts(queen.home / "known_hosts")
    old_fp = asyncssh_node.host_key_fingerprint
    code, out, err = await queen.keeper(*add_args(asyncssh_node))
    assert code == 0, err
    await asyncssh_node.change_host_key()
    before = (queen.home / "known_hosts").read_text()
    for extra in ([], ["--trust-host-key"]):
        code, out, err = await queen.keeper("setup", "update-node", "--name", "n1", "--ssh-port", str(asyncssh_node.port), *extra)
        assert code == 1
        assert "SSH_HOST_KEY_CHANGED" in err and old_fp in err and asyncssh_node.host_key_fingerprint in err
    assert (queen.home / "known_hosts").read_text() == before
    code, out, err = await queen.keeper("setup", "check-node", "--name", "n1", "--ssh-only")
    assert code == 1 and "SSH_HOST_KEY_CHANGED" in err
    [node] = await nodes(queen)
    # It answered, with another key: not unreachable, but the error is kept.
    assert node["status"] == "reachable" and "SSH_HOST_KEY_CHANGED" in node["last_error"]


async def test_wrong_key_fails_once_without_retry(queen: QueenProc, asyncssh_node) -> None:
    asyncssh_node.write_known_hosts(queen.home / "known_hosts")
    code, out, err = await queen.keeper(*add_args(asyncssh_node, key=asyncssh_node.wrong_key_path))
    assert code == 1
    assert "SSH_AUTH_FAILED" in err and asyncssh_node.host in err and "600" in err
    assert "attempt 1/3" in err and "attempt 2/3" not in err
    assert await nodes(queen) == []


async def test_closed_port_is_refused_after_three_attempts(queen: QueenProc, asyncssh_node) -> None:
    port = free_port()
    node = asyncssh_node
    args = add_args(node)
    args[args.index("--ssh-port") + 1] = str(port)
    code, out, err = await queen.keeper(*args)
    assert code == 1
    assert "SSH_CONNECTION_FAILED" in err and "after 3 attempts" in err and f"127.0.0.1:{port}" in err
    assert all(f"attempt {i}/3" in err for i in (1, 2, 3))
    assert await nodes(queen) == []


async def test_silent_listener_times_out_after_three_attempts(queen: QueenProc, asyncssh_node) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        args = add_args(asyncssh_node)
        args[args.index("--ssh-port") + 1] = str(port)
        code, out, err = await queen.keeper(*args)
    finally:
        listener.close()
    assert code == 1
    assert "SSH_CONNECTION_FAILED" in err and "after 3 attempts" in err
    assert all(f"attempt {i}/3" in err for i in (1, 2, 3))


async def test_sigterm_stops_the_queen_with_exit_0(queen: QueenProc) -> None:
    assert await queen.terminate() == 0
    assert "SIGTERM received" in queen.text() and "queen-rbee stopped" in queen.text()
