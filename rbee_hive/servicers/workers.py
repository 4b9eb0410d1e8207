"""HiveWorkerService: spawn, follow, list, health, shutdown, sleep, logs (S6.1, S7, S8)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from rbee.backends import backend_name
from rbee.errors import RbeeError
from rbee.rpc import handle_errors
from rbee.v1 import common_pb2, registry_pb2, registry_pb2_grpc

from rbee_hive.context import HiveContext
from rbee_hive.logbook import HIVE_SOURCE
from rbee_hive.workers.manager import SpawnSpec
from rbee_hive.workers.start import start_worker

DEFAULT_TAIL = 50
# How long a worker may take to put its engine to sleep (weights copied to CPU memory).
SLEEP_TIMEOUT_S = 120


class HiveWorkerServicer(registry_pb2_grpc.HiveWorkerServiceServicer):
    def __init__(self, ctx: HiveContext) -> None:
        self._ctx = ctx
        self._manager = ctx.manager

    @handle_errors
    async def SpawnWorker(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.SpawnWorkerResponse:
        spec = SpawnSpec(
            model_path=request.model_path,
            backend=backend_name(request.backend) or "cpu",
            device=request.device,
            model_ref=request.model_ref,
            slots=request.slots,
            worker_api_key=request.worker_api_key,
        )
        # The spawn goes on even if the caller goes away: a half-started
        # worker must end up registered or cleaned up, never orphaned.
        record = await asyncio.shield(self._manager.spawn(spec))
        return registry_pb2.SpawnWorkerResponse(worker=record.to_proto(), log_path=str(record.log_path), worker_api_key=record.api_key)

    @handle_errors
    async def StartWorker(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.StartWorkerResponse]:
        queue: asyncio.Queue = asyncio.Queue()
        provisioning = getattr(self._ctx, "provisioning", None)
        work = asyncio.ensure_future(
            start_worker(self._manager, provisioning.models if provisioning else None, request, queue.put_nowait)
        )
        work.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield registry_pb2.StartWorkerResponse(event=item)
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    yield registry_pb2.StartWorkerResponse(event=item)
            record = work.result()
            yield registry_pb2.StartWorkerResponse(started=registry_pb2.WorkerAccess(worker=record.to_proto(), api_key=record.api_key))
        finally:
            if not work.done():
                work.cancel()

    @handle_errors
    async def GetWorkerAccess(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.GetWorkerAccessResponse:
        record = self._manager.require(request.worker_id)
        return registry_pb2.GetWorkerAccessResponse(access=registry_pb2.WorkerAccess(worker=record.to_proto(), api_key=record.api_key))

    @handle_errors
    async def WatchWorkers(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        async for msg in self._ctx.registry.feed.watch(request.hive_instance, request.after_seq):
            yield msg

    @handle_errors
    async def FollowWorker(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.FollowWorkerResponse]:
        record = self._manager.require(request.worker_id)
        last = None
        async for item in record.events.follow():
            last = item
            yield item
        # The stream always ends with where the worker stands now.
        current = record.to_proto()
        if last is None or not last.HasField("worker") or last.worker != current:
            yield registry_pb2.FollowWorkerResponse(worker=current)

    @handle_errors
    async def ListWorkers(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.ListWorkersResponse:
        if request.state not in common_pb2.WorkerState.values():
            raise RbeeError("INVALID_ARGUMENT", f"Unknown worker state {request.state}", {"field": "state"})
        records = self._ctx.registry.list(request.model_ref, request.state)
        return registry_pb2.ListWorkersResponse(workers=[r.to_proto() for r in records])

    @handle_errors
    async def CheckWorkersHealth(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.CheckWorkersHealthResponse:
        if request.worker_id:
            records = [self._manager.require(request.worker_id)]
        else:
            records = self._ctx.registry.all()
        results = await asyncio.gather(*(self._ctx.supervisor.probe(r) for r in records))
        return registry_pb2.CheckWorkersHealthResponse(
            workers=[
                registry_pb2.WorkerHealth(
                    worker=r.to_proto(),
                    reachable=h.reachable,
                    status=h.status,
                    latency_ms=h.latency_ms,
                    consecutive_failures=r.health_failures,
                )
                for r, h in zip(records, results)
            ]
        )

    @handle_errors
    async def ShutdownWorker(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.ShutdownWorkerResponse:
        self._manager.require(request.worker_id)
        grace = request.timeout_ms / 1000 if request.timeout_ms else None
        result = await asyncio.shield(self._manager.stop(request.worker_id, grace, "requested over the API"))
        return registry_pb2.ShutdownWorkerResponse(
            worker_id=result.worker_id, force_killed=result.force_killed, exit_code=result.exit_code
        )

    @handle_errors
    async def SleepWorker(self, request, context: grpc.aio.ServicerContext) -> registry_pb2.SleepWorkerResponse:
        """The worker's Sleep with the key the hive holds for it; its refusals
        (SLEEP_MODE_UNSUPPORTED, WORKER_BUSY, MODEL_LOADING) relayed as they are."""
        record = self._manager.require(request.worker_id)
        reply = await self._manager.client(record).sleep(timeout=SLEEP_TIMEOUT_S)
        self._ctx.narrate("💤", f"Worker {record.id} ({record.model_ref}) is asleep (level {reply.level}): its GPU memory is free")
        return registry_pb2.SleepWorkerResponse(worker_id=record.id, level=reply.level)

    @handle_errors
    async def StreamLogs(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.StreamLogsResponse]:
        book = self._ctx.logbook
        tail = request.tail_lines or DEFAULT_TAIL
        if request.worker_id:
            if request.worker_id not in book.sources() and self._manager.find(request.worker_id) is None:
                raise RbeeError(
                    "NOT_FOUND",
                    f"No log for worker {request.worker_id!r} on this node",
                    {"worker_id": request.worker_id, "logs_dir": str(book.dir)},
                    ["List the workers with `rbee-keeper workers list`"],
                )
            sources = [request.worker_id]
            wanted: str | None = request.worker_id
        else:
            sources = book.sources() or [HIVE_SOURCE]
            wanted = None
        # Subscribe and read the history without awaiting in between: no line lost or doubled.
        with book.follow(wanted) as follower:
            history = [(s, line) for s in sources for line in book.tail(s, tail)]
            for source, line in history:
                yield registry_pb2.StreamLogsResponse(source=source, line=line)
            if not request.follow:
                return
            while True:
                source, line = await follower.next()
                yield registry_pb2.StreamLogsResponse(source=source, line=line)
