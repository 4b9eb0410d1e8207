"""Which worker serves an HTTP request (docs/openai-api.md, routing).

1. A warm worker of the model anywhere in the cluster (the global worker
   registry), the one with the most free slots; with ``X-Rbee-Node`` only
   on that node. When every slot is busy the request waits in the admission
   queue (rbee_queen/admission.py) for the first that frees: the registry's
   figures, corrected by what this router has in flight, picked for a
   request not yet sent, and saw finish since the worker's last report.
2. Otherwise a cold start through the queen's task flow on a node: the one
   ``X-Rbee-Node`` names, else where the queen's placement puts it
   (rbee_queen/placement.py: a node holding the model where it fits, else
   any node where it fits), decided inside the start, so within the wait;
   its reasons are the start's first stage.
   Concurrent requests for one model on one node share one cold start; the
   waiters see its stages; a waiter gives up after ``cold_start_wait``
   (503 with Retry-After) while the start goes on for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import format_line, stage_of
from rbee.tls_identity import worker_identity
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, tasks_pb2

from rbee_queen.admission import AdmissionQueue, Queued
from rbee_queen.hives import HiveLink, tls_name
from rbee_queen.http.errors import ApiError
from rbee_queen.http.models import ModelDirectory, canonical
from rbee_queen.http.upstream import WorkerChannels, WorkerLease
from rbee_queen.nodes.relay import EventRelay
from rbee_queen.nodes.store import NodeStore
from rbee_queen.survey import Dispatched
from rbee_queen.tasks import TaskRunner
from rbee_queen.workers import ClusterWorkers, reachable_address

log = logging.getLogger(__name__)
State = common_pb2.WorkerState
COLD_RETRY_AFTER_S = 5
# A slot picked for a request counts as taken until the request uses it, or this long.
RESERVED_S = 30.0
LOAD_WAIT_S = 3600.0
# Workers whose pick counts are kept before the gone ones are dropped.
MAX_PICKED = 1024


class _Stages(EventRelay):
    """The task flow's events as short lines for everyone waiting on one cold start."""

    def __init__(self, narrate, start: "ColdStart") -> None:
        super().__init__(narrate)
        self._start = start

    def _wrap_event(self, ev: common_pb2.Event) -> str:
        if ev.HasField("narration"):
            return format_line(ev.narration)
        if ev.HasField("progress"):
            return self._start.progress_line(ev.progress)
        return ""

    def _wrap_result(self, result):  # pragma: no cover - run() is not used here
        return result

    def narrate(self, emoji: str, message: str, level: str = "info", actor: str = "queen-rbee") -> None:
        super().narrate(emoji, message, level, actor)
        self._flush()

    def relay(self, ev: common_pb2.Event) -> None:
        super().relay(ev)
        self._flush()

    def check(self, *args, **kwargs) -> None:
        super().check(*args, **kwargs)
        self._flush()

    def _flush(self) -> None:
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line:
                self._start.publish(line)


@dataclass
class ColdStart:
    node: str
    ref: str
    task: asyncio.Task | None = None
    stages: list[str] = field(default_factory=list)
    listeners: list[asyncio.Queue] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)
    # Requests waiting on it now (the metrics' rbee_requests_queued).
    waiting: int = 0
    # The task flow handed out a worker that was already there (the registry had not heard of it yet).
    warm: bool = False

    _last_progress: tuple[str, int] = ("", -1)

    def progress_line(self, p: common_pb2.ProgressEvent) -> str:
        """A progress event as a line, or "" when it says little new (same
        stage, less than 10 % further): downloads report often."""
        pct = int(p.done * 100 // p.total) if p.total else -1
        stage = stage_of(p)
        key = (stage, pct // 10)
        if key == self._last_progress:
            return ""
        self._last_progress = key
        shown = f" {pct}%" if pct >= 0 else ""
        return f"{stage}{shown} {p.message}".strip()

    def publish(self, line: str) -> None:
        line = " ".join(line.split())[:300]
        self.stages.append(line)
        del self.stages[:-50]
        for q in self.listeners:
            q.put_nowait(line)


@dataclass
class _Cached:
    lease: WorkerLease
    in_flight: int = 0


class Router:
    def __init__(self, store: NodeStore, registry: ClusterWorkers, tasks: TaskRunner, narrate,
                 cold_start_wait_s: float, channels: WorkerChannels | None = None,
                 queue: AdmissionQueue | None = None) -> None:  # fmt: skip
        self.store = store
        self.registry = registry
        self.tasks = tasks
        self.narrate = narrate
        self.cold_start_wait_s = cold_start_wait_s
        self.models = ModelDirectory(store, registry)
        self.channels = channels or WorkerChannels()
        self._access: dict[str, _Cached] = {}
        self._cold: dict[tuple[str, str], ColdStart] = {}
        # Requests waiting for a busy model's slot: the queen's one queue (shared with the task API).
        if queue is None:
            queue = tasks.queue if tasks is not None else AdmissionQueue(changes=registry.listen)
        self.queue = queue
        # Slots picked for a request that has not begun on the worker yet (monotonic times).
        self._reserved: dict[str, list[float]] = {}
        # When this router last picked each worker (a running count), for ties between equally free workers.
        self._picked: dict[str, int] = {}
        self._picks = 0
        # Requests that ended on each worker since its last load report.
        self._finished = Dispatched()
        # Observers of routing decisions (metrics): called with (event, **labels).
        self.observers: list[Callable[..., None]] = []

    def _observe(self, event: str, **labels) -> None:
        for fn in self.observers:
            with contextlib.suppress(Exception):
                fn(event, **labels)

    # -- warm ----------------------------------------------------------------------

    def warm(self, ref: str, node: str | None) -> list[tuple[int, str, common_pb2.WorkerInfo]]:
        """(free slots, node, worker) of every worker serving ``ref`` with a free slot, most free first."""
        out = []
        for cw in self.registry.list(node=node or ""):
            w = cw.worker
            if canonical(w.model_ref) != ref or w.state not in (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY):
                continue
            mine = (self._access[w.id].in_flight if w.id in self._access else 0) + self._reserved_now(w.id)
            reported = w.slots_total - w.slots_available - self._finished.pending(w)
            free = w.slots_total - max(mine, reported)
            out.append((free, cw.node, w))
        # Ties go to the worker this router picked longest ago (round robin): quick requests
        # leave every worker equally free most of the time, and the first listed would take
        # them all. Not the one picked least: a replica added later would take every tie
        # until it caught up with the others' past.
        out.sort(key=lambda t: (-t[0], self._picked.get(t[2].id, -1)))
        return out

    async def _lease_for(self, node: str, worker: common_pb2.WorkerInfo) -> WorkerLease:
        cached = self._access.get(worker.id)
        if cached is not None:
            return cached.lease
        record = self.store.get(node)
        async with HiveLink(record) as link:
            reply = await link.call(link.workers.GetWorkerAccess, registry_pb2.GetWorkerAccessRequest(worker_id=worker.id))
        access = reply.access
        lease = WorkerLease(node, access.worker.id, reachable_address(record, access.worker.address), access.api_key,
                            access.worker.tls, canonical(access.worker.model_ref),
                            worker_identity(tls_name(record), access.worker.id) if access.worker.tls and record.tls else "")  # fmt: skip
        self._access[worker.id] = _Cached(lease)
        return lease

    def forget(self, lease: WorkerLease) -> None:
        """A worker that failed a call is looked up afresh next time."""
        self._access.pop(lease.worker_id, None)

    def _reserved_now(self, worker_id: str) -> int:
        times = self._reserved.get(worker_id)
        if not times:
            return 0
        cutoff = time.monotonic() - RESERVED_S
        times[:] = [t for t in times if t > cutoff]
        return len(times)

    def _reserve(self, worker_id: str) -> None:
        self._reserved.setdefault(worker_id, []).append(time.monotonic())

    def _unreserve(self, worker_id: str) -> None:
        times = self._reserved.get(worker_id)
        if times:
            times.pop(0)
        if not times:
            self._reserved.pop(worker_id, None)

    @contextlib.asynccontextmanager
    async def using(self, lease: WorkerLease, picked: bool = True) -> AsyncIterator[WorkerLease]:
        """The request runs on ``lease``'s worker; ``picked``: its slot was
        reserved by pick() (a lease from a cold start was not)."""
        cached = self._access.setdefault(lease.worker_id, _Cached(lease))
        cached.in_flight += 1
        if picked:
            self._unreserve(lease.worker_id)
        try:
            yield lease
        finally:
            cached.in_flight -= 1
            # Its slot is free now: counted until the worker's next report says so itself.
            reported = self.registry.worker(lease.node, lease.worker_id)
            if reported is not None:
                self._finished.add(reported)
            self.queue.wake(lease.model_ref)

    # -- the decision ----------------------------------------------------------------

    async def pick(self, ref: str, node: str | None) -> WorkerLease | None:
        """A warm worker's lease, or None when the model needs a cold start.
        Every matching worker busy: the request waits in the admission queue;
        past its bounds 429 (ALL_SLOTS_BUSY)."""
        if node:
            self.store.get(node)  # NODE_NOT_FOUND → 404
        candidates = self.warm(ref, node)
        if not candidates:
            return None
        total = sum(w.slots_total for _, _, w in candidates)

        async def take() -> WorkerLease | None:
            now = self.warm(ref, node)
            if not now or now[0][0] <= 0:
                return None
            _, name, worker = now[0]
            self._reserve(worker.id)  # before any await: the next look counts it taken
            if len(self._picked) > MAX_PICKED:  # workers come and go: keep those still listed
                self._picked = {w.id: self._picked[w.id] for _, _, w in now if w.id in self._picked}
            self._picks += 1
            self._picked[worker.id] = self._picks
            try:
                return await self._lease_for(name, worker)
            except BaseException:
                self._unreserve(worker.id)
                raise

        def queued(q: Queued) -> None:
            self.narrate("⏳", f"All {total} slots of {ref} are busy: an HTTP request queued, position {q.position} of {q.length}")

        def refuse(why: str, waited_s: float) -> RbeeError:
            return self.queue.refusal(ref, total, why, waited_s, node or "")

        got = await self.queue.admit(f"{ref} on {node}" if node else ref, ref, take, refuse, queued)
        self._observe("warm", model=ref, node=got.slot.node)
        return got.slot

    def cold_node(self, ref: str, node: str | None) -> str:
        """The node ``X-Rbee-Node`` pins, else "": the cold start places
        itself (rbee_queen/placement.py) as its first stage, inside the wait."""
        if node:
            return node
        try:
            records = self.store.list()
        except RbeeError:
            records = []
        if not records:
            raise RbeeError("NODE_NOT_FOUND", "No node is registered with the queen: there is nowhere to load the model",
                            {"model": ref}, ["Register one: `rbee-keeper setup add-node --name NAME --local`"])  # fmt: skip
        return ""

    def cold_start(self, ref: str, node: str) -> ColdStart:
        """The cold start of ``ref`` on ``node`` ("": where the placement puts
        it): the running one, or a new one."""
        key = (node, ref)
        start = self._cold.get(key)
        if start is not None and start.task is not None and not start.task.done():
            return start
        start = ColdStart(node, ref)
        start.task = asyncio.ensure_future(self._run_cold(start))
        start.task.add_done_callback(lambda t, k=key, s=start: self._cold_done(k, s, t))
        self._cold[key] = start
        self._observe("cold_start", model=ref, node=node)
        return start

    def _cold_done(self, key, start: ColdStart, task: asyncio.Task) -> None:
        if self._cold.get(key) is start:
            del self._cold[key]
        if not task.cancelled() and task.exception() is not None:
            log.info("cold start of %s on %s failed: %s", start.ref, start.node, task.exception())
        outcome = "cancelled" if task.cancelled() else "failed" if task.exception() is not None else "ready"
        if not start.warm:  # a worker that was there already is no cold start
            self._observe("cold_start_done", model=start.ref, node=start.node, seconds=time.monotonic() - start.began,
                          outcome=outcome)  # fmt: skip

    def load(self) -> tuple[dict[str, int], dict[str, int]]:
        """Requests on a worker now and requests waiting on a cold start now, per model."""
        running: dict[str, int] = {}
        for cached in list(self._access.values()):
            if cached.in_flight > 0:
                running[cached.lease.model_ref] = running.get(cached.lease.model_ref, 0) + cached.in_flight
        queued: dict[str, int] = {}
        for start in list(self._cold.values()):
            if start.waiting > 0:
                queued[start.ref] = queued.get(start.ref, 0) + start.waiting
        return running, queued

    async def _run_cold(self, start: ColdStart) -> WorkerLease:
        relay = _Stages(self.narrate, start)
        if not start.node:
            chosen, _, _ = await self.tasks.placement(start.ref, "cpu", 0, 0, relay)
            start.publish("🧭 " + chosen.narration())
            start.node = chosen.node
            start.publish(f"loading {start.ref} on {chosen.node}")
        request = tasks_pb2.SubmitInferenceRequest(node=start.node, model_ref=start.ref, backend=common_pb2.BACKEND_CPU)
        assignment = await self.tasks.submit(request, relay)
        start.warm = assignment.warm
        worker = assignment.worker
        lease = WorkerLease(assignment.node, worker.id, worker.address, assignment.api_key, worker.tls, start.ref, worker.tls_name)
        await self._wait_loaded(lease, start)
        self._access[worker.id] = _Cached(lease)
        start.publish(f"worker {worker.id} ready on {assignment.node}")
        return lease

    async def _wait_loaded(self, lease: WorkerLease, start: ColdStart) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(self.channels.get(lease))
        call = stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=lease.metadata,
                                          timeout=LOAD_WAIT_S, wait_for_ready=True)  # fmt: skip
        try:
            async for msg in call:
                if msg.HasField("progress") and stage_of(msg.progress):
                    line = start.progress_line(msg.progress)
                    if line:
                        start.publish(line)
                elif msg.HasField("narration"):
                    start.publish(format_line(msg.narration))
        except grpc.RpcError as err:
            raise from_rpc_error(err, lease.address) from None
        finally:
            call.cancel()

    async def wait_cold(self, start: ColdStart, on_stage: Callable[[str], None] | None = None) -> WorkerLease:
        """Wait for ``start`` up to the configured time; 503 COLD_START_TIMEOUT after it."""
        assert start.task is not None
        queue: asyncio.Queue = asyncio.Queue()
        if on_stage is not None:
            start.listeners.append(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cold_start_wait_s
        start.waiting += 1
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise RbeeError("COLD_START_TIMEOUT",
                                    f"{start.ref} is still loading on {start.node}: try again in a moment",
                                    {"model": start.ref, "node": start.node, "retry_after": COLD_RETRY_AFTER_S})  # fmt: skip
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({start.task, getter}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if getter in done and on_stage is not None:
                    on_stage(getter.result())
                else:
                    getter.cancel()
                if start.task in done:
                    return start.task.result()
        finally:
            start.waiting -= 1
            if queue in start.listeners:
                start.listeners.remove(queue)

    async def route(self, model: str, node: str | None) -> tuple[str, WorkerLease | None, ColdStart | None]:
        """(model reference, a warm lease or None, the cold start it waits on or None)."""
        ref = await self.models.resolve(model)
        if node is not None and not node.strip():
            raise ApiError(400, "X-Rbee-Node is empty", "X-Rbee-Node", "invalid_value")
        lease = await self.pick(ref, node)
        if lease is not None:
            return ref, lease, None
        return ref, None, self.cold_start(ref, self.cold_node(ref, node))

    async def close(self) -> None:
        for start in list(self._cold.values()):
            if start.task is not None:
                start.task.cancel()
        await self.channels.close()
