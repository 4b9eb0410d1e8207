"""What a real queen stores for a node: a git branch that git would read as
an option is refused by add-node and update-node alike (before, it was saved
and a second install ran it: `--upload-pack=touch MARKER;git-upload-pack`),
and UpdateNode refuses the hive port AddNode refuses."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.errors import from_rpc_error
from rbee.v1 import nodes_pb2, nodes_pb2_grpc

from tests.fixtures.hive import free_port_block
from tests.fixtures.queen import QueenProc

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def nodes(queen: QueenProc) -> dict[str, dict]:
    code, out, err = await queen.keeper("setup", "list-nodes", "--json")
    assert code == 0, err
    return {n["name"]: n for n in map(json.loads, out.splitlines())}


async def test_git_option_injection_and_port_zero_are_refused(queen: QueenProc, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = f"--git-branch=--upload-pack=touch {marker};git-upload-pack"
    base = ["setup", "add-node", "--name", "n", "--local", "--install-path", str(tmp_path / "rbee"),
            "--git-repo", str(tmp_path / "repo"), "--hive-port", str(free_port_block(1))]  # fmt: skip

    code, out, err = await queen.keeper(*base, evil)
    assert code == 1 and "INVALID_GIT_REF" in err and "starts with '-'" in err, err
    assert "n" not in await nodes(queen)

    code, out, err = await queen.keeper(*base)
    assert code == 0, err
    code, out, err = await queen.keeper("setup", "update-node", "--name", "n", evil)
    assert code == 1 and "INVALID_GIT_REF" in err, err
    code, out, err = await queen.keeper("setup", "update-node", "--name", "n", "--git-repo", f"ext::sh -c touch% {marker}")
    assert code == 1 and "INVALID_GIT_URL" in err, err

    # A client other than the keeper (which checks ports itself) asks for hive port 0.
    key = (queen.home / "queen.key").read_text().strip()
    channel = open_channel(queen.address)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            async for _ in nodes_pb2_grpc.NodeServiceStub(channel).UpdateNode(
                nodes_pb2.UpdateNodeRequest(name="n", hive_port=0), metadata=auth_metadata(key), timeout=30
            ):
                pass
    finally:
        await channel.close()
    error = from_rpc_error(caught.value)
    assert error.code == "INVALID_ARGUMENT" and error.details["field"] == "hive_port", error

    stored = (await nodes(queen))["n"]
    assert stored["git_branch"] == "main" and stored["git_repo_url"] == str(tmp_path / "repo") and stored["hive_port"] > 0
    assert not marker.exists()
