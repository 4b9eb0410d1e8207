"""ReplicaService: the models the queen keeps running (docs/queen.md, "Replicas")."""

from __future__ import annotations

import grpc

from rbee.rpc import handle_errors
from rbee.v1 import replicas_pb2, replicas_pb2_grpc

from rbee_queen.reconcile import Reconciler


class ReplicaServicer(replicas_pb2_grpc.ReplicaServiceServicer):
    def __init__(self, reconciler: Reconciler) -> None:
        self._reconciler = reconciler

    @handle_errors
    async def DeployModel(self, request: replicas_pb2.DeployModelRequest, context: grpc.aio.ServicerContext) -> replicas_pb2.DeployModelResponse:
        return await self._reconciler.deploy(request)

    @handle_errors
    async def UndeployModel(self, request: replicas_pb2.UndeployModelRequest, context: grpc.aio.ServicerContext) -> replicas_pb2.UndeployModelResponse:
        return await self._reconciler.undeploy(request)

    @handle_errors
    async def ListDeployments(self, request: replicas_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext) -> replicas_pb2.ListDeploymentsResponse:
        return self._reconciler.list()
