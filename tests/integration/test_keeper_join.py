"""A keeper on another machine joins the cluster with a one-time token
(docs/security.md): a real queen serving TLS beyond loopback, real keeper
processes with homes of their own, real handshakes."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from rbee.tls import ClusterCA
from tests.fixtures.common import VENV_BIN, health_status, proc_env
from tests.fixtures.hive import free_port_block

pytestmark = pytest.mark.asyncio(loop_scope="session")


def keeper(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "rbee-keeper"), *args], capture_output=True, text=True, timeout=120, env=env)


async def test_a_keeper_elsewhere_joins_with_a_one_time_token(tmp_path: Path) -> None:
    queen_home, other_home = tmp_path / "queen-home", tmp_path / "other-home"
    queen_home.mkdir()
    other_home.mkdir()
    (tmp_path / "c.toml").write_text("")
    port = free_port_block(2)  # the queen's port and its enrolment port
    address = f"127.0.0.1:{port}"
    base = proc_env(HOME=str(tmp_path), RBEE_CONFIG=str(tmp_path / "c.toml"), RBEE_TLS="on")
    on_queen = {**base, "RBEE_HOME": str(queen_home)}
    elsewhere = {**base, "RBEE_HOME": str(other_home), "RBEE_QUEEN_API_KEY": "", "HOME": str(other_home)}
    log = (tmp_path / "queen.out").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "queen-rbee"), "daemon", "--host", "0.0.0.0", "--port", str(port), "--http-port", "0",
        stdout=log, stderr=asyncio.subprocess.STDOUT, env=on_queen,
    )  # fmt: skip
    try:
        for _ in range(300):
            assert proc.returncode is None, (tmp_path / "queen.out").read_text()
            if (queen_home / "tls" / "ca.key").exists() and (queen_home / "queen.key").exists():
                if await health_status(address, ClusterCA(queen_home).client_identity()) == "SERVING":
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "queen.out").read_text())
        elsewhere["RBEE_QUEEN_API_KEY"] = (queen_home / "queen.key").read_text().strip()

        # Before: the other machine has nothing, and says how to get it.
        before = await asyncio.to_thread(keeper, elsewhere, "setup", "list-nodes", "--queen", address)
        assert before.returncode != 0 and "TLS_CLIENT_MISSING" in before.stderr and "setup join" in before.stderr

        made = await asyncio.to_thread(keeper, on_queen, "setup", "enrol-token", "--ttl", "10m")
        assert made.returncode == 0, made
        token = made.stdout.strip()
        assert token.startswith("rbee1.") and "rbee1." not in made.stderr  # the token on stdout only

        # A token of another cluster: refused before anything secret is sent.
        stranger_home = tmp_path / "stranger"
        ClusterCA(stranger_home).ca_pem()
        foreign = await asyncio.to_thread(keeper, {**on_queen, "RBEE_HOME": str(stranger_home)}, "setup", "enrol-token")
        bad = await asyncio.to_thread(keeper, elsewhere, "setup", "join", address, "--token", foreign.stdout.strip())
        assert bad.returncode != 0 and "ENROL_CA_MISMATCH" in bad.stderr, bad

        joined = await asyncio.to_thread(keeper, elsewhere, "setup", "join", address, "--token", token)
        assert joined.returncode == 0, joined
        folder = other_home / "tls"
        for name in ("ca.crt", "client.crt", "client.key"):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600
        assert (folder / "ca.crt").read_bytes() == (queen_home / "tls" / "ca.crt").read_bytes()
        assert b"PRIVATE KEY" not in (folder / "client.crt").read_bytes()

        # After: the keeper there talks to the queen over mutual TLS.
        after = await asyncio.to_thread(keeper, elsewhere, "setup", "list-nodes", "--queen", address)
        assert after.returncode == 0 and "No nodes registered" in after.stdout + after.stderr, after

        # The token worked once.
        again_home = tmp_path / "third"
        again = await asyncio.to_thread(keeper, {**elsewhere, "RBEE_HOME": str(again_home)}, "setup", "join", address, "--token", token)
        assert again.returncode != 0 and "ENROL_TOKEN_INVALID" in again.stderr, again
        assert not (again_home / "tls" / "client.crt").exists()

        # The queen's own port still refuses a client without a certificate;
        # the enrolment port serves enrolment alone.
        from rbee.tls import TlsIdentity
        from rbee.tls_identity import QUEEN_NAME

        bare = TlsIdentity((queen_home / "tls" / "ca.crt").read_bytes()).for_peer(QUEEN_NAME)
        assert await health_status(address, bare) == "refused: UNAVAILABLE"
        assert await health_status(f"127.0.0.1:{port + 1}", bare) == "refused: UNIMPLEMENTED"
    finally:
        proc.terminate()
        await proc.wait()
        log.close()
