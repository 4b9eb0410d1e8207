"""Versions in both directions through real processes (docs/behaviour.md S4.2,
rbee/client_version.py): the keeper program (a subprocess) sends its release
with every call; a real queen and a real hive refuse one older than their
min_keeper_version with the advice to upgrade the keeper. A daemon setting
raises the minimum above this release, which makes the real keeper the older
side; a test client sends the headers of other releases (older, a newer API)
to a queen of the default minimum. A newer keeper talking to an older daemon
(gRPC UNIMPLEMENTED) keeps its own advice: tests/unit/keeper/test_older_daemon.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.config import VERSION
from rbee.errors import from_rpc_error
from rbee.v1 import nodes_pb2, nodes_pb2_grpc
from tests.fixtures.common import VENV_BIN, health_status, proc_env
from tests.fixtures.hive import HIVE_KEY, HiveProc
from tests.fixtures.queen import QueenProc

pytestmark = pytest.mark.asyncio(loop_scope="session")

UPGRADE = "git pull && make setup"


async def test_a_queen_refuses_a_keeper_older_than_its_minimum_and_says_to_upgrade_the_keeper(queen_factory) -> None:
    queen: QueenProc = await queen_factory(RBEE_QUEEN_MIN_KEEPER_VERSION="0.2.0")
    code, out, err = await queen.keeper("setup", "list-nodes")
    assert code == 1 and out == "", err
    assert "VERSION_MISMATCH" in err, err
    assert f"serves rbee-keeper 0.2.0 or newer, and this rbee-keeper is {VERSION}" in err, err
    assert "Upgrade the rbee-keeper" in err and UPGRADE in err, err
    assert "`rbee-keeper --version` (it should print 0.2.0 or newer)" in err, err
    # Health stays open: a client of any release can tell the queen is up.
    assert await health_status(queen.address) == "SERVING"


async def test_the_default_minimum_serves_this_keeper_and_refuses_older_ones(queen_factory) -> None:
    queen: QueenProc = await queen_factory()
    code, out, err = await queen.keeper("setup", "list-nodes")
    assert code == 0, err

    key = (queen.home / "queen.key").read_text().strip()
    channel = open_channel(queen.address)
    nodes = nodes_pb2_grpc.NodeServiceStub(channel)

    async def list_nodes(*headers: tuple[str, str]) -> grpc.RpcError | None:
        try:
            await nodes.ListNodes(nodes_pb2.ListNodesRequest(), metadata=(*auth_metadata(key), *headers), timeout=10)
        except grpc.RpcError as exc:
            return exc
        return None

    try:
        # No release said (a client of the first release, any gRPC client): served.
        assert await list_nodes() is None
        old = await list_nodes(("x-rbee-client", "rbee-keeper"), ("x-rbee-version", "0.0.9"), ("x-rbee-api-version", "v1"))
        assert old is not None and old.code() == grpc.StatusCode.FAILED_PRECONDITION
        error = from_rpc_error(old)
        assert error.code == "VERSION_MISMATCH" and error.details["client_version"] == "0.0.9"
        assert any(UPGRADE in s for s in error.suggestions), error.suggestions
        # A keeper of a later API: the queen is the older side and says so.
        newer = await list_nodes(("x-rbee-client", "rbee-keeper"), ("x-rbee-version", "0.3.0"), ("x-rbee-api-version", "v2"))
        error = from_rpc_error(newer)
        assert error.code == "VERSION_MISMATCH" and "is older than the rbee-keeper calling it" in error.message
        assert "Update rbee on the queen-rbee's machine" in error.suggestions[0]
        # Without the key the refusal is the key's: the version check tells a stranger nothing.
        try:
            await nodes.ListNodes(nodes_pb2.ListNodesRequest(), metadata=(("x-rbee-version", "0.0.9"),), timeout=10)
        except grpc.RpcError as exc:
            assert from_rpc_error(exc).code == "MISSING_API_KEY"
        else:
            raise AssertionError("served without a key")
    finally:
        await channel.close()


async def test_a_hive_used_directly_refuses_an_older_keeper(start_hive) -> None:
    hive: HiveProc = await start_hive(extra_env={"RBEE_HIVE_MIN_KEEPER_VERSION": "0.2.0"})
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), "models", "list", "--hive", hive.address, "--api-key", HIVE_KEY,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=proc_env(RBEE_CONFIG=str(hive.home / "no-config.toml")),
    )  # fmt: skip
    out, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 1 and out == b"", text
    assert "VERSION_MISMATCH" in text and "rbee-hive" in text and f"this rbee-keeper is {VERSION}" in text, text
    assert UPGRADE in text, text
