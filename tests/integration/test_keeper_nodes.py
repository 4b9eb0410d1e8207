"""Naming a machine by its node name (S11): `models`, `logs` and `workers
health|shutdown` take --node NAME, resolved through the queen (which hands
out the node's hive address and key), or a default node from the config file;
--hive HOST:PORT stays for direct use. Real processes: a queen, this machine
as a local node, its hive started by `setup check-node`."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from tests.fixtures.queen import KEEPER_BIN, QueenProc, kill_node_hives
from tests.integration.test_queen_tasks import local_node, node_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def ready_node(queen: QueenProc, home: Path) -> int:
    port = await local_node(queen, home)
    code, out, err = await queen.keeper("setup", "check-node", "--name", "here")
    assert code == 0, err
    return port


async def test_commands_reach_a_node_by_name_and_by_the_default_node(queen_factory, node_env, tmp_path: Path) -> None:  # noqa: F811
    queen = await queen_factory(**node_env)
    home = tmp_path / "node-home"
    try:
        hive_port = await ready_node(queen, home)
        for args in (["models", "list"], ["workers", "health"]):
            code, out, err = await queen.keeper("--verbose", *args, "--node", "here")
            assert code == 0, err
            assert f"hive at 127.0.0.1:{hive_port}" in err, err  # --verbose says where --node led
        code, out, err = await queen.keeper("models", "list", "--node", "here", "--json")
        assert code == 0 and out == "", (out, err)  # one JSON object per model: none yet

        # The same through the default node of the config file: no --node at all.
        config = queen.user_home / ".config" / "rbee" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text('[keeper]\nnode = "here"\n')
        code, out, err = await queen.keeper("--verbose", "workers", "health")
        assert code == 0, err
        assert f"node here ({config} [keeper] node): hive at 127.0.0.1:{hive_port}" in err, err

        # An unknown node is the queen's NODE_NOT_FOUND with what to type next.
        code, out, err = await queen.keeper("models", "list", "--node", "nowhere")
        assert code == 1 and out == ""
        assert "NODE_NOT_FOUND" in err and "rbee-keeper setup list-nodes" in err

        # --hive and --node name the same thing: one of them.
        code, out, err = await queen.keeper("logs", "--node", "here", "--hive", f"127.0.0.1:{hive_port}")
        assert code == 1 and "USAGE_ERROR" in err

        # status: one screen (or one JSON object) with the queen, the node and its hive, workers, models.
        code, out, err = await queen.keeper("status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["queen"]["address"] == queen.address
        assert [(n["name"], n["hive_running"]) for n in status["nodes"]] == [("here", True)]
        assert status["workers"] == [] and status["models"] == [] and status["models_unavailable"] == {}
        code, out, err = await queen.keeper("status")
        assert code == 0 and f"QUEEN  {queen.address}" in out and "here" in out and "workers: none running" in out, out

        # logs --follow streams until Ctrl+C, then exits 130.
        proc = await asyncio.create_subprocess_exec(
            str(KEEPER_BIN), "logs", "--node", "here", "--follow", "--queen", queen.address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=queen.keeper_env(),
        )  # fmt: skip
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b" | " in first, first
        proc.send_signal(signal.SIGINT)
        rest, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130, err_bytes.decode()
        assert b"Traceback" not in err_bytes
    finally:
        await queen.close()
        kill_node_hives(home)
