"""TaskService (one inference task, S1) and ClusterWorkerService (every
worker on every node, S6.2)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc

from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.rpc import handle_errors
from rbee.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

from rbee_queen.nodes.relay import TaskRelay
from rbee_queen.survey import LogRelay
from rbee_queen.tasks import TaskRunner
from rbee_queen.workers import ClusterWorkers


CAPABILITY = re.compile(r"^(cpu|cuda|metal)(:\d{1,4})?$")


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, runner: TaskRunner, log: Narrator) -> None:
        self._runner = runner
        self._log = log

    @handle_errors
    async def SubmitInference(self, request: tasks_pb2.SubmitInferenceRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[tasks_pb2.TaskEvent]:
        relay = TaskRelay(self._log)
        async for item in relay.run(self._runner.submit(request, relay)):
            yield item

    @handle_errors
    async def FitModel(self, request: tasks_pb2.FitModelRequest, context: grpc.aio.ServicerContext) -> tasks_pb2.FitModelResponse:
        return await self._runner.fit(request, LogRelay(self._log))


class ClusterWorkerServicer(tasks_pb2_grpc.ClusterWorkerServiceServicer):
    def __init__(self, registry: ClusterWorkers) -> None:
        self._registry = registry

    @handle_errors
    async def ListClusterWorkers(self, request: tasks_pb2.ListClusterWorkersRequest, context: grpc.aio.ServicerContext) -> tasks_pb2.ListClusterWorkersResponse:
        cap = request.capability.strip().lower()
        if cap and not CAPABILITY.match(cap):
            raise RbeeError("INVALID_ARGUMENT", f"Unknown capability {request.capability!r}: use cpu, cuda, metal, or BACKEND:DEVICE such as cuda:1",
                            {"field": "capability"}, ["Pass --capability cpu or --capability cuda:0"])  # fmt: skip
        if request.state not in common_pb2.WorkerState.values():
            raise RbeeError("INVALID_ARGUMENT", f"Unknown worker state {request.state}", {"field": "state"})
        workers = self._registry.list(request.node, request.model_ref, cap, request.state)
        return tasks_pb2.ListClusterWorkersResponse(workers=workers)
