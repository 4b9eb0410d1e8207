"""A node's life through the queen as users drive it: add-node, install (a
git clone of the code under test, the engine shared from this checkout's
.venv), check-node (SSH preflight, the hive started over the transport, the
hive preflight), remove-node — over asyncssh's server, over OpenSSH's sshd,
and locally."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.channel import open_channel

from tests.fixtures.hive import free_port_block
from tests.fixtures.queen import QueenProc, kill_node_hives, make_repo, node_hive_pids

pytestmark = pytest.mark.asyncio(loop_scope="session")


def add_args(node, name: str, base: Path, repo: Path, hive_port: int, *extra: str) -> list[str]:
    return [
        "setup", "add-node", "--name", name, "--ssh-host", node.host, "--ssh-port", str(node.port),
        "--ssh-user", node.user, "--ssh-key", str(node.key_path), "--git-repo", str(repo),
        "--install-path", str(base / "rbee"), "--rbee-home", str(base / "home"), "--hive-port", str(hive_port),
        "--trust-host-key", *extra,
    ]  # fmt: skip


async def list_nodes(queen: QueenProc) -> dict[str, dict]:
    code, out, err = await queen.keeper("setup", "list-nodes", "--json")
    assert code == 0, err
    return {n["name"]: n for n in map(json.loads, out.splitlines())}


async def install_and_check(queen: QueenProc, name: str) -> tuple[str, str]:
    code, out, install_err = await queen.keeper("setup", "install", "--node", name)
    assert code == 0, install_err
    code, out, check_err = await queen.keeper("setup", "check-node", "--name", name)
    assert code == 0, check_err
    return install_err, check_err


async def test_add_install_check_remove_over_ssh(queen: QueenProc, asyncssh_node, repo_snapshot: Path, tmp_path: Path) -> None:
    base = tmp_path / "node-a"
    port = free_port_block(1)
    try:
        code, out, err = await queen.keeper(*add_args(asyncssh_node, "a", base, repo_snapshot, port))
        assert code == 0, err
        assert "rbee-keeper setup install --node a" in err

        install_err, check_err = await install_and_check(queen, "a")
        for step in ("Checking git and python3", "Fetching", "Setting up the Python environment", "Verifying the hive program"):
            assert re.search(rf"✅ {re.escape(step)}.*\(\d+\.\ds\)", install_err), install_err
        assert "rbee installed on a: rbee-hive 0.1.0" in install_err
        for line in ("SSH latency", "rbee-hive 0.1.0 found at", "Starting rbee-hive on a", "Hive health: healthy",
                     "Hive version 0.1.0 is compatible", "Backends: cpu (1 device)", "Resources: RAM", "Node a is ready"):  # fmt: skip
            assert line in check_err, check_err
        [pid] = node_hive_pids(base / "home")
        assert (base / "home" / "logs" / "hive.log").is_file()
        key_file = base / "home" / "hive.key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        key = key_file.read_text().strip()
        assert key not in " ".join(psutil.Process(pid).cmdline())
        assert key not in (base / "home" / "logs" / "hive.log").read_text()

        node = (await list_nodes(queen))["a"]
        assert node["hive_running"] and node["hive_started_by_queen"] and node["status"] == "reachable"
        assert node["backends"] == {"cpu": 1} and node["last_connected_unix_ms"] > 0

        # Again: updated in place, the setup step finds nothing changed.
        code, out, err = await queen.keeper("setup", "install", "--node", "a")
        assert code == 0, err
        assert "already set up (nothing changed since the last run)" in err

        # A second check finds the hive answering and starts nothing.
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 0, err
        assert "rbee-hive answers at" in err and "Starting rbee-hive" not in err
        assert node_hive_pids(base / "home") == [pid]

        code, out, err = await queen.keeper("setup", "remove-node", "--name", "a")
        assert code == 0, err
        assert f"Stopped the hive this queen had started on a (pid {pid})" in err
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        kill_node_hives(base / "home")


async def test_two_nodes_are_kept_apart(queen: QueenProc, asyncssh_node, repo_snapshot: Path, tmp_path: Path) -> None:
    bases = {name: tmp_path / f"node-{name}" for name in ("left", "right")}
    ports = {"left": free_port_block(1), "right": free_port_block(1)}
    try:
        for name, base in bases.items():
            code, out, err = await queen.keeper(*add_args(asyncssh_node, name, base, repo_snapshot, ports[name]))
            assert code == 0, err
        await asyncio.gather(*(install_and_check(queen, name) for name in bases))
        listed = await list_nodes(queen)
        for name, base in bases.items():
            assert listed[name]["install_path"] == str(base / "rbee")
            assert listed[name]["hive_port"] == ports[name] and listed[name]["hive_running"]
            [pid] = node_hive_pids(base / "home")
            assert psutil.Process(pid).cmdline()[1] == str(base / "rbee" / ".venv" / "bin" / "rbee-hive")
        keys = {name: (base / "home" / "hive.key").read_text() for name, base in bases.items()}
        assert keys["left"] != keys["right"]
    finally:
        for base in bases.values():
            kill_node_hives(base / "home")


async def test_install_failure_shows_the_remote_command_and_its_output(queen: QueenProc, asyncssh_node, tmp_path: Path) -> None:
    base = tmp_path / "node-bad"
    code, out, err = await queen.keeper(*add_args(asyncssh_node, "bad", base, tmp_path / "no-such-repo", free_port_block(1)))
    assert code == 0, err
    code, out, err = await queen.keeper("setup", "install", "--node", "bad")
    assert code == 1
    assert "INSTALL_FAILED" in err and "step 'Fetching" in err and "exit_status: 128" in err
    assert "no-such-repo" in err and "does not exist" in err
    assert "rbee-keeper setup update-node --name bad --git-repo URL" in err


async def test_hive_of_another_api_version_is_refused(queen: QueenProc, asyncssh_node, tmp_path: Path) -> None:
    def older(tree: Path) -> None:
        config = tree / "rbee" / "config.py"
        config.write_text(config.read_text().replace('API_VERSION = "v1"', 'API_VERSION = "v0"'))

    repo = make_repo(tmp_path / "old-repo", edit=older)
    base = tmp_path / "node-old"
    try:
        code, out, err = await queen.keeper(*add_args(asyncssh_node, "old", base, repo, free_port_block(1)))
        assert code == 0, err
        code, out, err = await queen.keeper("setup", "install", "--node", "old")
        assert code == 0, err
        code, out, err = await queen.keeper("setup", "check-node", "--name", "old")
        assert code == 1
        assert "VERSION_MISMATCH" in err and "API v0" in err and "API v1" in err
        assert "older than this queen" in err and "rbee-keeper setup install --node old" in err
    finally:
        kill_node_hives(base / "home")


async def test_a_queen_stops_only_the_hives_it_started(queen_factory, tmp_path: Path) -> None:
    """A local node: the first queen starts its hive and dies without stopping
    it; the next queen (same registry) finds the hive running, and on SIGTERM
    leaves it alone; a queen that started a hive stops it on SIGTERM."""
    home = tmp_path / "node-home"
    port = free_port_block(1)
    try:
        first = await queen_factory(name="shared")
        code, out, err = await first.keeper("setup", "add-node", "--name", "here", "--local", "--rbee-home", str(home),
                                            "--hive-port", str(port))  # fmt: skip
        assert code == 0, err
        code, out, err = await first.keeper("setup", "check-node", "--name", "here")
        assert code == 0, err
        [pid] = node_hive_pids(home)
        first.proc.kill()
        await first.proc.wait()

        second = await queen_factory(name="shared")
        code, out, err = await second.keeper("setup", "check-node", "--name", "here")
        assert code == 0, err
        assert "rbee-hive answers at" in err
        assert await second.terminate() == 0
        assert node_hive_pids(home) == [pid]

        third = await queen_factory(name="shared")
        kill_node_hives(home)
        code, out, err = await third.keeper("setup", "check-node", "--name", "here")
        assert code == 0, err
        [new_pid] = node_hive_pids(home)
        assert await third.terminate() == 0
        assert f"Stopping the hive this queen started on here (pid {new_pid})" in third.text()
        assert node_hive_pids(home) == []
    finally:
        kill_node_hives(home)


async def test_main_path_over_openssh_sshd(queen: QueenProc, sshd_node, repo_snapshot: Path, tmp_path: Path) -> None:
    base = tmp_path / "node-sshd"
    try:
        # With --tls (the node is on loopback here, where TLS is not the default):
        # the queen's CA issues the hive's certificates and writes them over SSH.
        code, out, err = await queen.keeper(*add_args(sshd_node, "box", base, repo_snapshot, free_port_block(1), "--json", "--tls"))
        assert code == 0, err
        node = json.loads(out)
        assert node["status"] == "reachable" and node["tls"] is True
        assert "Issued box's hive certificate" in err
        tls_dir = base / "home" / "tls"
        assert stat.S_IMODE(os.stat(tls_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tls_dir / "hive.key").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tls_dir / "hive-issuer.key").st_mode) == 0o600
        install_err, check_err = await install_and_check(queen, "box")
        assert "rbee installed on box" in install_err
        # The hive preflight went over mutual TLS; the hive refuses clear text.
        assert "Node box is ready" in check_err and "Backends: cpu" in check_err
        assert "(mutual TLS)" in (base / "home" / "logs" / "hive.log").read_text()
        hive_address = f"127.0.0.1:{node['hive_port']}"
        async with open_channel(hive_address) as channel:
            with pytest.raises(grpc.RpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        code, out, err = await queen.keeper("setup", "remove-node", "--name", "box")
        assert code == 0 and "Stopped the hive this queen had started on box" in err
    finally:
        kill_node_hives(base / "home")
