"""Keys for applications through the real programs: a queen process, the
keeper's console script creating, listing (never showing a key), refusing
duplicates and bad names, revoking; the key opens the queen's HTTP API (the
official `openai` client and /metrics) and nothing of its gRPC, and a revoked
key is refused by the very next request (docs/security.md)."""

from __future__ import annotations

import json
import re

import grpc
import httpx
import openai
import pytest

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.errors import from_rpc_error
from rbee.v1 import nodes_pb2, nodes_pb2_grpc

from tests.fixtures.hive import free_port_block
from tests.fixtures.queen import QueenProc

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = re.compile(r"rbee_[A-Za-z0-9_-]{43}")


async def create(queen: QueenProc, name: str, *args: str) -> str:
    code, out, err = await queen.keeper("keys", "create", "--name", name, *args)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and KEY.fullmatch(lines[0]), out  # the key alone on stdout
    assert "shown this once" in err and lines[0] not in err
    return lines[0]


async def grpc_status(queen: QueenProc, key: str) -> tuple[grpc.StatusCode, str]:
    channel = open_channel(queen.address)
    try:
        await nodes_pb2_grpc.NodeServiceStub(channel).ListNodes(nodes_pb2.ListNodesRequest(), metadata=auth_metadata(key), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), from_rpc_error(exc).code
    finally:
        await channel.close()
    return grpc.StatusCode.OK, ""


async def test_create_list_revoke_through_the_keeper(queen: QueenProc) -> None:
    key = await create(queen, "webui")
    admin = await create(queen, "ops", "--scope", "admin")
    assert key != admin

    code, out, err = await queen.keeper("keys", "list")
    assert code == 0, err
    assert "webui" in out and "inference" in out and "ops" in out and "admin" in out and "never" in out
    assert key not in out + err and admin not in out + err
    code, out, err = await queen.keeper("keys", "list", "--json")
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(k["name"], k["key_scope"]) for k in listed] == [("ops", "admin"), ("webui", "inference")]
    assert all(k["created_at_unix_ms"] > 0 and k["last_used_unix_ms"] == 0 for k in listed)
    assert key not in out

    # For scripts: --quiet leaves the key alone on stdout and nothing on stderr.
    code, out, err = await queen.keeper("--quiet", "keys", "create", "--name", "script")
    assert code == 0 and KEY.fullmatch(out.strip()) and err == "", (out, err)
    code, out, err = await queen.keeper("keys", "revoke", "script")
    assert code == 0, err

    # A taken name: a stable code and both ways out; the first key is untouched.
    code, out, err = await queen.keeper("keys", "create", "--name", "webui")
    assert code == 1 and out == ""
    assert "APP_KEY_EXISTS" in err and "rbee-keeper keys revoke webui" in err and "Traceback" not in err
    # Bad names are the queen's INVALID_ARGUMENT naming the field; a bad scope the keeper's (the request carries an enum).
    for args in (["--name", "bad name"], ["--name", "x" * 65], ["--name", "ok", "--scope", "root"]):
        code, out, err = await queen.keeper("keys", "create", *args)
        assert code == 1 and out == "" and "INVALID_ARGUMENT" in err and "Traceback" not in err, (args, err)

    # An application key opens nothing of the queen's gRPC: it is for the HTTP API.
    assert await grpc_status(queen, key) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
    assert await grpc_status(queen, admin) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")

    code, out, err = await queen.keeper("keys", "revoke", "webui")
    assert code == 0, err
    assert "revoked" in err and out == ""
    code, out, err = await queen.keeper("keys", "revoke", "webui")
    assert code == 1 and "APP_KEY_NOT_FOUND" in err and "rbee-keeper keys list" in err
    code, out, err = await queen.keeper("keys", "list", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["ops"]
    assert "Application key 'webui' revoked" in queen.text() and key not in queen.text()


async def test_the_keys_commands_need_the_queens_key(queen: QueenProc) -> None:
    code, out, err = await queen.keeper("keys", "create", "--name", "webui", "--api-key", "not-the-key")
    assert code == 1 and out == "" and "INVALID_API_KEY" in err
    code, out, err = await queen.keeper("keys", "list", "--json")
    assert code == 0 and out == "", err


async def test_a_key_opens_the_http_api_until_it_is_revoked(queen_factory) -> None:
    http_port = free_port_block(1)
    queen = await queen_factory(RBEE_QUEEN_HTTP_PORT=str(http_port))
    root = f"http://127.0.0.1:{http_port}"
    key = await create(queen, "webui")
    ops = await create(queen, "ops", "--scope", "admin")
    client = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=30)
    try:
        assert (await client.models.list()).data == []  # accepted: no node, so no model yet
        async with httpx.AsyncClient(timeout=30) as http:
            for who in (key, ops):
                resp = await http.get(f"{root}/metrics", headers={"Authorization": f"Bearer {who}"})
                assert resp.status_code == 200 and "rbee_requests_total" in resp.text
            assert (await http.get(f"{root}/metrics")).status_code == 401
        # An inference key on an admin route of the HTTP API.
        with pytest.raises(openai.PermissionDeniedError):
            await client.post(f"{root}/api/web/workers/stop", body={"node": "here", "worker_id": "w-1"}, cast_to=object)
        # Last use shows in the listing at once.
        code, out, err = await queen.keeper("keys", "list", "--json")
        used = {k["name"]: k["last_used_unix_ms"] for k in map(json.loads, out.splitlines())}
        assert used["webui"] > 0 and used["ops"] > 0, out

        code, out, err = await queen.keeper("keys", "revoke", "webui")
        assert code == 0, err
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        # The other key and the queen's own are untouched.
        admin = (queen.home / "queen.key").read_text().strip()
        for other in (ops, admin):
            async with openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=other, max_retries=0, timeout=30) as c:
                assert (await c.models.list()).data == []
    finally:
        await client.close()
    assert key not in queen.text() and ops not in queen.text()
    # The last use reaches beehives.db when the queen stops: a new queen of the same home lists it.
    assert await queen.terminate() == 0
    again = await queen_factory(RBEE_QUEEN_HTTP_PORT=str(free_port_block(1)))
    assert again.home == queen.home
    code, out, err = await again.keeper("keys", "list", "--json")
    assert code == 0, err
    assert [(k["name"], k["last_used_unix_ms"] > 0) for k in map(json.loads, out.splitlines())] == [("ops", True)]
