"""PreflightService: what the node has and whether a worker fits (S4.2, S4.3)."""

from __future__ import annotations

import asyncio

import grpc

from rbee.backends import backend_enum, backend_name
from rbee.enum_words import HIVE_STATUSES, RESOURCES
from rbee.errors import RbeeError
from rbee.rpc import handle_errors
from rbee.v1 import preflight_pb2, preflight_pb2_grpc

from rbee_hive.context import HiveContext
from rbee_hive.detect import detect
from rbee_hive.preflight import check_worker, estimate_memory, model_size


class PreflightServicer(preflight_pb2_grpc.PreflightServiceServicer):
    def __init__(self, ctx: HiveContext) -> None:
        self._ctx = ctx

    @handle_errors
    async def GetHiveHealth(self, request, context: grpc.aio.ServicerContext) -> preflight_pb2.GetHiveHealthResponse:
        ctx = self._ctx
        return preflight_pb2.GetHiveHealthResponse(
            hive_status=HIVE_STATUSES.number(ctx.status),
            version=ctx.version,
            api_version=ctx.api_version,
            hostname=ctx.hostname,
            uptime_ms=int(ctx.uptime_s() * 1000),
            workers=len(ctx.registry),
            idle_timeout_ms=int(ctx.settings.idle_timeout.total_seconds() * 1000),
        )

    @handle_errors
    async def GetBackends(self, request, context: grpc.aio.ServicerContext) -> preflight_pb2.GetBackendsResponse:
        detection = await asyncio.to_thread(detect, self._ctx.resources)
        return preflight_pb2.GetBackendsResponse(
            backends=[
                preflight_pb2.BackendInfo(name=backend_enum(b.name), available=b.available, device_count=b.device_count, detail=b.detail)
                for b in detection.backends
            ]
        )

    @handle_errors
    async def GetResources(self, request, context: grpc.aio.ServicerContext) -> preflight_pb2.GetResourcesResponse:
        res = await asyncio.to_thread(self._ctx.resources.snapshot, self._ctx.settings.models_dir)
        return preflight_pb2.GetResourcesResponse(
            ram_total_bytes=res.ram_total_bytes,
            ram_available_bytes=res.ram_available_bytes,
            disk_path=res.disk_path,
            disk_total_bytes=res.disk_total_bytes,
            disk_available_bytes=res.disk_available_bytes,
            gpus=[
                preflight_pb2.GpuResources(
                    index=g.index, name=g.name, vram_total_bytes=g.vram_total_bytes, vram_available_bytes=g.vram_available_bytes
                )
                for g in res.gpus
            ],
            overridden=res.overridden,
        )

    @handle_errors
    async def CheckWorkerResources(self, request, context: grpc.aio.ServicerContext) -> preflight_pb2.CheckWorkerResourcesResponse:
        size = request.model_size_bytes
        path = None
        if not size:
            if not request.model_path:
                raise RbeeError(
                    "INVALID_ARGUMENT",
                    "Give model_size_bytes or model_path",
                    {"field": "model_size_bytes"},
                    ["Pass the model's size in bytes, or the path of a model on this node"],
                )
            # Only a model this hive could load is sized (S13): no walk of a client's tree.
            path = self._ctx.manager.models.check_path(request.model_path)
            size = await asyncio.to_thread(model_size, path)
        detection = await asyncio.to_thread(detect, self._ctx.resources)
        res = await asyncio.to_thread(self._ctx.resources.snapshot, self._ctx.settings.models_dir)
        backend = backend_name(request.backend)
        memory = None
        if path is not None:  # the dtype the worker would choose, from the model's config.json
            memory = await asyncio.to_thread(
                estimate_memory, path, backend, size, res.ram_available_bytes, self._ctx.settings.worker_dtype
            )
        checks = check_worker(detection, res, backend, request.device, size, request.needs_download, memory)
        return preflight_pb2.CheckWorkerResourcesResponse(
            checks=[
                preflight_pb2.ResourceCheck(
                    resource=RESOURCES.number(c.name), passed=c.passed, required_bytes=c.required_bytes, available_bytes=c.available_bytes,
                    message=c.message,
                )
                for c in checks
            ],
            model_size_bytes=size,
        )
