"""`rbee-keeper status` against a queen of a release without deployments: a
real gRPC server with the queen's node and worker services and no
ReplicaService stands in for it. The screen says so instead of failing."""

from __future__ import annotations

import json

import grpc

from rbee.v1 import nodes_pb2, nodes_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from rbee_keeper.commands.status import _status


class Nodes(nodes_pb2_grpc.NodeServiceServicer):
    async def ListNodes(self, request, context):
        return nodes_pb2.ListNodesResponse()


class Workers(tasks_pb2_grpc.ClusterWorkerServiceServicer):
    async def ListClusterWorkers(self, request, context):
        return tasks_pb2.ListClusterWorkersResponse()


async def _older_queen() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(Nodes(), server)
    tasks_pb2_grpc.add_ClusterWorkerServiceServicer_to_server(Workers(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_status_of_a_queen_without_deployments_says_so(capsys) -> None:
    server, address = await _older_queen()
    try:
        assert await _status(address, "k" * 32, False) == 0
        out = capsys.readouterr().out
        assert "workers: none running" in out
        assert "deployments: this queen's release keeps none (update it to deploy models)" in out
        assert await _status(address, "k" * 32, True) == 0
        assert json.loads(capsys.readouterr().out)["deployments"] == []
    finally:
        await server.stop(None)
