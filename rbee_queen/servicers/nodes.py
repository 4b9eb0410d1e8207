"""NodeService: the node registry and what the queen does on nodes (S3, S4.1, S4.2)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rbee.narration import Narrator
from rbee.rpc import handle_errors
from rbee.v1 import nodes_pb2, nodes_pb2_grpc

from rbee_queen.nodes.manager import NodeManager
from rbee_queen.nodes.relay import NodeEventRelay
from rbee_queen.workers import HiveWatchers


class NodeServicer(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self, manager: NodeManager, log: Narrator, watchers: HiveWatchers) -> None:
        self._nodes = manager
        self._log = log
        self._watchers = watchers

    def _relay(self) -> NodeEventRelay:
        return NodeEventRelay(self._log)

    @handle_errors
    async def AddNode(self, request: nodes_pb2.AddNodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[nodes_pb2.NodeEvent]:
        relay = self._relay()
        async for item in relay.run(self._nodes.add(request, relay)):
            yield item
        self._watchers.ensure(request.name.strip())

    @handle_errors
    async def UpdateNode(self, request: nodes_pb2.UpdateNodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[nodes_pb2.NodeEvent]:
        relay = self._relay()
        async for item in relay.run(self._nodes.update(request, relay)):
            yield item

    @handle_errors
    async def RemoveNode(self, request: nodes_pb2.RemoveNodeRequest, context: grpc.aio.ServicerContext) -> nodes_pb2.RemoveNodeResponse:
        reply = await self._nodes.remove(request.name)
        await self._watchers.stop(request.name)
        self._log("🗑️", f"Node {request.name} removed. {reply.message}")
        return reply

    @handle_errors
    async def ListNodes(self, request: nodes_pb2.ListNodesRequest, context: grpc.aio.ServicerContext) -> nodes_pb2.ListNodesResponse:
        return nodes_pb2.ListNodesResponse(nodes=await self._nodes.list())

    @handle_errors
    async def InstallNode(self, request: nodes_pb2.InstallNodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[nodes_pb2.NodeEvent]:
        relay = self._relay()
        async for item in relay.run(self._nodes.install(request.name, relay)):
            yield item

    @handle_errors
    async def CheckNode(self, request: nodes_pb2.CheckNodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[nodes_pb2.NodeEvent]:
        relay = self._relay()
        async for item in relay.run(self._nodes.check(request.name, relay, request.ssh_only)):
            yield item
        self._watchers.ensure(request.name)

    @handle_errors
    async def GetNodeAccess(self, request: nodes_pb2.GetNodeAccessRequest, context: grpc.aio.ServicerContext) -> nodes_pb2.GetNodeAccessResponse:
        record = self._nodes.store.get(request.name.strip())
        return nodes_pb2.GetNodeAccessResponse(
            node=await self._nodes.to_proto(record, probe=False), hive_address=record.hive_address, hive_api_key=record.hive_key
        )
