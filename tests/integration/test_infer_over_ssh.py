"""`rbee-keeper infer` end to end to a node reached over OpenSSH's sshd on
127.0.0.1 (docs/behaviour.md S1): the node has its own install path and its
own RBEE_HOME; the queen runs the SSH preflight and starts the node's hive
over sshd, the hive downloads the model from the test hub and spawns a worker
(cold start), the keeper streams its tokens; the next infer finds that worker
(warm start) without SSH. Then replicas across real nodes (docs/queen.md,
"Replicas"): `models deploy --replicas 2` on a local node and a node over sshd
puts one worker on each, the SSH node's hive started over sshd; that node
lost (its hive stopped with SIGSTOP), its replica is placed on the local node.

The node's install path holds a launcher for this checkout's rbee-hive (with
the node's settings, as an operator's environment would set them) instead of a
fresh install: installing over sshd is tested by
tests/integration/test_queen_install.py. The worker is the stand-in (the real
worker program and servicer on a fake engine, tests/unit/worker/fake_worker_main.py):
what is shown here is the path over SSH, not what vLLM generates."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

import psutil
import pytest

from tests.fixtures.common import VENV_BIN
from tests.fixtures.hive import free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives, node_hive_pids
from tests.integration import test_queen_replicas as replicated
from tests.integration.test_queen_placement import add_local
from tests.integration.test_queen_tasks import until

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


async def add_ssh_node(queen: QueenProc, sshd_node, hub, base: Path, name: str = "box", **hive: str) -> Path:
    """Node ``name`` over sshd with its own install path (a launcher for this
    checkout's hive on the stand-in worker, with ``hive`` settings) and its own
    RBEE_HOME, returned; its hive not started yet."""
    standin = write_standin_program(base / "standin")
    ports = free_port_block(4)  # the node's worker ports, apart from other hives on this machine
    install = node_install(base / "rbee", **hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(standin), STANDIN_LOAD_S="0.3",
                                                     RBEE_HIVE_WORKER_PORT_START=str(ports), RBEE_HIVE_WORKER_PORT_END=str(ports + 3),
                                                     **hive))  # fmt: skip
    home = base / "home"
    code, out, err = await queen.keeper(
        "setup", "add-node", "--name", name, "--ssh-host", sshd_node.host, "--ssh-port", str(sshd_node.port),
        "--ssh-user", sshd_node.user, "--ssh-key", str(sshd_node.key_path), "--install-path", str(install),
        "--rbee-home", str(home), "--hive-port", str(free_port_block(1)), "--trust-host-key",
    )  # fmt: skip
    assert code == 0, err
    assert not node_hive_pids(home)
    return home


def started_over_ssh(home: Path) -> int:
    """The pid of the node's one hive, checked to run with the node's home and to have come over sshd."""
    [pid] = node_hive_pids(home)
    env = psutil.Process(pid).environ()
    assert env["RBEE_HOME"] == str(home) and env.get("SSH_CONNECTION", "").startswith("127.0.0.1 "), env
    return pid


async def test_cold_then_warm_infer_on_a_node_over_openssh(queen: QueenProc, sshd_node, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    home = tmp_path / "node-box" / "home"
    try:
        await add_ssh_node(queen, sshd_node, hub, tmp_path / "node-box")

        # Cold: the hive is started over sshd, the model downloaded, a worker spawned.
        code, out, err = await queen.keeper("infer", "--node", "box", "--model", REF, "--prompt", "hi", "--max-tokens", "3")
        assert code == 0, err
        assert out == ANSWER + "\n", err
        for line in ("SSH latency", "Starting rbee-hive on box", "rbee-hive on box is up", "Cold start: no worker serves"):
            assert line in err, err
        pid = started_over_ssh(home)
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


async def test_two_replicas_across_a_local_node_and_a_node_over_openssh(queen_factory, sshd_node, hub, tmp_path: Path) -> None:
    """`models deploy --replicas 2` on a cluster of a local node and a node
    over sshd: one worker on each, the SSH node's hive started over sshd by
    the deployment itself; the SSH node lost, its replica placed on the local
    node; undeploy stops them."""
    hub.add_repo(replicated.REPO, replicated.FILES)
    program = write_standin_program(tmp_path / "standin")
    beat = {"RBEE_HIVE_WATCH_HEARTBEAT": "0.3s"}
    queen = await queen_factory(**hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), STANDIN_LOAD_S="0.3", **beat,
                                           **dict(replicated.QUEEN_ENV, RBEE_QUEEN_HIVE_START_TIMEOUT="60s")))  # fmt: skip
    local_home = tmp_path / "home-here"
    box_home = tmp_path / "node-box" / "home"
    stopped: int | None = None
    try:
        await add_local(queen, "here", local_home)
        await add_ssh_node(queen, sshd_node, hub, tmp_path / "node-box", **beat)

        code, out, err = await queen.keeper("models", "deploy", replicated.REF, "--replicas", "2")
        assert code == 0, err
        workers = await until(lambda: replicated.ready(2, {"here", "box"})(queen), replicated.DEADLINE_S)
        assert workers, queen.text()[-4000:]
        hives = {"box": started_over_ssh(box_home)}
        assert "Accepted publickey" in sshd_node.log()
        [hives["here"]] = node_hive_pids(local_home)
        assert "SSH_CONNECTION" not in psutil.Process(hives["here"]).environ()
        # Each worker is a process of its own node's hive.
        for w in workers:
            assert hives[w["node"]] in {p.pid for p in psutil.Process(w["pid"]).parents()}, (w, hives)

        # The SSH node's hive stops answering (SIGSTOP) and stays so: once the
        # registry drops its worker, the replica is placed on the local node.
        stopped = hives["box"]
        os.kill(stopped, signal.SIGSTOP)
        moved = await until(lambda: replicated.ready(2, {"here"})(queen), replicated.DEADLINE_S)
        assert moved, queen.text()[-4000:]
        assert "box: unreachable" in queen.text()
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        # box answers again with its old worker: one replica too many, and the
        # queen stops an idle one (undeploying before the registry has heard
        # box again would leave that worker out of what undeploy stops).
        scaled_down = f"{replicated.REF}: 3 replicas run, 2 wanted: stopping "

        async def stopped_an_extra() -> bool:
            return scaled_down in queen.text()

        assert await until(stopped_an_extra, replicated.DEADLINE_S), queen.text()[-4000:]
        assert await until(lambda: replicated.ready(2)(queen), replicated.DEADLINE_S), queen.text()[-4000:]

        code, out, err = await queen.keeper("models", "undeploy", replicated.REF, "--json")
        assert code == 0, err

        async def gone() -> bool:
            return not await replicated.replicas(queen)

        assert await until(gone, replicated.DEADLINE_S), queen.text()[-4000:]
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        for home in (local_home, box_home):
            kill_node_hives(home)
