"""WorkerCallbackService: the workers' ready callback and state reports.

The API-key interceptor leaves this service open; each worker proves itself
with the per-worker callback key the hive gave it (checked in the manager)."""

from __future__ import annotations

import grpc

from rbee.rpc import handle_errors
from rbee.v1 import registry_pb2, registry_pb2_grpc

from rbee_hive.workers.manager import WorkerManager


class WorkerCallbackServicer(registry_pb2_grpc.WorkerCallbackServiceServicer):
    def __init__(self, manager: WorkerManager) -> None:
        self._manager = manager

    @handle_errors
    async def ReportWorker(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.ReportWorkerResponse:
        self._manager.report(request, context.invocation_metadata())
        return registry_pb2.ReportWorkerResponse()
