"""`rbee-keeper infer` end to end to a node reached over OpenSSH's sshd on
127.0.0.1 (docs/behaviour.md S1): the node has its own install path and its
own RBEE_HOME; the queen runs the SSH preflight and starts the node's hive
over sshd, the hive downloads the model from the test hub and spawns a worker
(cold start), the keeper streams its tokens; the next infer finds that worker
(warm start) without SSH.

The node's install path holds a launcher for this checkout's rbee-hive (with
the node's settings, as an operator's environment would set them) instead of a
fresh install: installing over sshd is tested by
tests/integration/test_queen_install.py. The worker is the stand-in (the real
worker program and servicer on a fake engine, tests/unit/worker/fake_worker_main.py):
what is shown here is the path over SSH, not what vLLM generates."""

from __future__ import annotations

import shlex
from pathlib import Path

import psutil
import pytest

from tests.fixtures.common import VENV_BIN
from tests.fixtures.hive import free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives, node_hive_pids

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "rbee-test/over-ssh"
REF = f"hf:{REPO}"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 1_000_000, "tokenizer.json": b"{}"}
ANSWER = "t1 t2 t3 "


def node_install(folder: Path, **env: str) -> Path:
    """An install path whose .venv/bin/rbee-hive runs this checkout's hive with ``env``."""
    program = folder / ".venv" / "bin" / "rbee-hive"
    program.parent.mkdir(parents=True)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    program.write_text(f"#!/bin/sh\n{exports}exec {VENV_BIN / 'rbee-hive'} \"$@\"\n")
    program.chmod(0o755)
    return folder


async def test_cold_then_warm_infer_on_a_node_over_openssh(queen: QueenProc, sshd_node, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    standin = write_standin_program(tmp_path / "standin")
    base = tmp_path / "node-box"
    ports = free_port_block(4)  # the node's worker ports, apart from other hives on this machine
    install = node_install(base / "rbee", **hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(standin), STANDIN_LOAD_S="0.3",
                                                     RBEE_HIVE_WORKER_PORT_START=str(ports), RBEE_HIVE_WORKER_PORT_END=str(ports + 3)))
    home = base / "home"
    try:
        code, out, err = await queen.keeper(
            "setup", "add-node", "--name", "box", "--ssh-host", sshd_node.host, "--ssh-port", str(sshd_node.port),
            "--ssh-user", sshd_node.user, "--ssh-key", str(sshd_node.key_path), "--install-path", str(install),
            "--rbee-home", str(home), "--hive-port", str(free_port_block(1)), "--trust-host-key",
        )  # fmt: skip
        assert code == 0, err
        assert not node_hive_pids(home)

        # Cold: the hive is started over sshd, the model downloaded, a worker spawned.
        code, out, err = await queen.keeper("infer", "--node", "box", "--model", REF, "--prompt", "hi", "--max-tokens", "3")
        assert code == 0, err
        assert out == ANSWER + "\n", err
        for line in ("SSH latency", "Starting rbee-hive on box", "rbee-hive on box is up", "Cold start: no worker serves"):
            assert line in err, err
        [pid] = node_hive_pids(home)
        hive = psutil.Process(pid)
        assert hive.environ()["RBEE_HOME"] == str(home) and hive.environ().get("SSH_CONNECTION", "").startswith("127.0.0.1 ")
        assert (home / "logs" / "hive.log").is_file() and (home / "models").is_dir()
        assert "Accepted publickey" in sshd_node.log()

        # Warm: the same worker answers; no SSH, no new hive.
        logins = sshd_node.log().count("Accepted publickey")
        code, out, err = await queen.keeper("infer", "--node", "box", "--model", REF, "--prompt", "hi", "--max-tokens", "3")
        assert code == 0, err
        assert out == ANSWER + "\n", err
        assert "Warm start: worker" in err and "Starting rbee-hive" not in err and "Cold start" not in err, err
        assert node_hive_pids(home) == [pid]
        assert sshd_node.log().count("Accepted publickey") == logins
    finally:
        kill_node_hives(home)
