"""A daemon of an older release that lacks an RPC this keeper calls: gRPC's own
UNIMPLEMENTED becomes VERSION_MISMATCH saying which side is older. A real gRPC
server without the queen's services stands in for that queen."""

from __future__ import annotations

import grpc
import pytest

from rbee.config import API_VERSION, VERSION
from rbee.errors import RbeeError
from rbee.v1 import nodes_pb2_grpc
from rbee_keeper.queen_client import QueenClient


async def test_an_rpc_the_queen_does_not_have_names_the_older_side() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with QueenClient(f"127.0.0.1:{port}", "k" * 32, "--api-key") as client:
            with pytest.raises(RbeeError) as caught:
                await client.list_app_keys()
    finally:
        await server.stop(None)
    err = caught.value
    assert err.code == "VERSION_MISMATCH", err
    assert "older rbee than this rbee-keeper" in err.message and VERSION in err.message and API_VERSION in err.message
    assert any("Update the queen" in s for s in err.suggestions)


async def test_rbees_own_errors_are_left_as_they_are() -> None:
    class Refusing(nodes_pb2_grpc.NodeServiceServicer):
        async def ListNodes(self, request, context):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    server = grpc.aio.server()
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with QueenClient(f"127.0.0.1:{port}", "k" * 32, "--api-key") as client:
            with pytest.raises(RbeeError) as caught:
                await client.list_nodes()
    finally:
        await server.stop(None)
    assert caught.value.code == "NOT_FOUND"
