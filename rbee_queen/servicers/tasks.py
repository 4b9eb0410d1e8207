"""TaskService (one inference task, S1) and ClusterWorkerService (every
worker on every node, S6.2)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rbee.narration import Narrator
from rbee.rpc import handle_errors
from rbee.v1 import tasks_pb2, tasks_pb2_grpc

from rbee_queen.nodes.relay import TaskRelay
from rbee_queen.tasks import TaskRunner
from rbee_queen.workers import ClusterWorkers


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, runner: TaskRunner, log: Narrator) -> None:
        self._runner = runner
        self._log = log

    @handle_errors
    async def SubmitInference(self, request: tasks_pb2.SubmitInferenceRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[tasks_pb2.TaskEvent]:
        relay = TaskRelay(self._log)
        async for item in relay.run(self._runner.submit(request, relay)):
            yield item


class ClusterWorkerServicer(tasks_pb2_grpc.ClusterWorkerServiceServicer):
    def __init__(self, registry: ClusterWorkers) -> None:
        self._registry = registry

    @handle_errors
    async def ListClusterWorkers(self, request: tasks_pb2.ListClusterWorkersRequest, context: grpc.aio.ServicerContext) -> tasks_pb2.ListClusterWorkersResponse:
        workers = self._registry.list(request.node, request.model_ref, request.capability.strip().lower(), request.state)
        return tasks_pb2.ListClusterWorkersResponse(workers=workers)
