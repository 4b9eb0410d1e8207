"""One inference task (S1 steps 2-9), as the queen runs it.

node lookup → the node's hive made ready (answering already: nothing to do;
else SSH preflight and the hive started over the node's transport) → the
hive's workers: an idle worker (a free slot) with the same model, backend and
device is a warm start and is handed out at once; a worker for the model still
loading is joined; when every slot of the matching workers is busy the request
waits in the admission queue (rbee_queen/admission.py) for the first slot that
frees, ALL_SLOTS_BUSY past its bounds → otherwise a cold start: hive preflight, then the hive's StartWorker (catalog,
download with progress, worker environment, resource preflight, spawn), its
events relayed. The task ends with the worker's address and its own key.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from rbee.backends import backend_enum, backend_name
from rbee.errors import RbeeError, from_rpc_error
from rbee.modelref import parse_model_ref
from rbee.tls_identity import worker_identity
from rbee.v1 import common_pb2, registry_pb2, tasks_pb2

from rbee_queen.activity import Activity, Tracked
from rbee_queen.admission import AdmissionQueue, Queued
from rbee_queen.eviction import Evictor
from rbee_queen.hives import HiveLink, hive_preflight, tls_name
from rbee_queen.keepalive import KeepAlive, parse_keep_alive
from rbee_queen.nodes.manager import NodeManager
from rbee_queen.nodes.relay import EventRelay
from rbee_queen.nodes.store import NodeRecord, NodeStore
from rbee_queen.placement import NodeView, Placement, WarmView, place
from rbee_queen.survey import Dispatched, NodeFigures, fit_rows, same_model, survey_node, views
from rbee_queen.workers import HiveWatchers, reachable_address

State = common_pb2.WorkerState
# A cold start's StartWorker: preflight, download, provisioning and spawn.
START_WORKER_TIMEOUT_S = 3 * 3600


def queue_key(ref: str, node: str, backend: str, device: int) -> str:
    """The admission queue's line of a task: the model on one node and device."""
    return f"{ref} on {node} ({backend}:{device})"


def _backend(value: int) -> str:
    """A request's backend: cpu when not given; INVALID_BACKEND for a number this queen does not know."""
    return backend_name(value) or "cpu"


class TaskRunner:
    def __init__(self, store: NodeStore, nodes: NodeManager, watchers: HiveWatchers, activity: Activity | None = None,
                 queue: AdmissionQueue | None = None) -> None:  # fmt: skip
        self.store = store
        self.nodes = nodes
        self.watchers = watchers
        # Requests waiting for a slot of a busy model (shared with the front door).
        self.queue = queue if queue is not None else AdmissionQueue(changes=watchers.registry.listen)
        # Requests handed to each worker since its last load report (rbee_queen/survey.py).
        self.dispatched = Dispatched()
        # Every task's lines and outcome, for the web page (docs/web.md).
        self.activity = activity if activity is not None else Activity()
        # Idle memory (docs/queen.md): set by the queen's server.
        self.keepalive: KeepAlive | None = None
        self.evictor: Evictor | None = None

    async def submit(self, req: tasks_pb2.SubmitInferenceRequest, relay: EventRelay) -> tasks_pb2.WorkerAssignment:
        keep_alive = parse_keep_alive(req.keep_alive, "keep_alive")
        assignment = await self._submit_tracked(req, relay)
        if self.keepalive is not None:
            self.keepalive.handed(assignment.node, assignment.worker.id, str(parse_model_ref(req.model_ref)), keep_alive)
        return assignment

    async def _submit_tracked(self, req: tasks_pb2.SubmitInferenceRequest, relay: EventRelay) -> tasks_pb2.WorkerAssignment:
        entry = self.activity.begin("task", f"Task {req.model_ref} on {req.node or '(placed)'}", req.node, req.model_ref)
        tracked = Tracked(relay, self.activity, entry)

        def outcome(a: tasks_pb2.WorkerAssignment) -> str:
            return f"{'warm' if a.warm else 'cold'} start: worker {a.worker.id} at {a.worker.address}"

        return await self.activity.run(entry, self._submit(req, tracked), outcome)  # type: ignore[arg-type]

    async def _submit(self, req: tasks_pb2.SubmitInferenceRequest, relay: EventRelay) -> tasks_pb2.WorkerAssignment:
        started = time.monotonic()
        ref = str(parse_model_ref(req.model_ref))
        backend = _backend(req.backend)
        if req.node:
            record = self.store.get(req.node)
            relay.narrate("📋", f"Task: {ref} on {record.name} ({backend}:{req.device})")
            await self.nodes.ensure_ready(record, relay)
        else:
            relay.narrate("📋", f"Task: {ref}, placed by the queen ({backend}:{req.device})")
            record, worker = await self._place(ref, backend, req, relay)
            if worker is not None and not self.queue.waiting(queue_key(ref, record.name, backend, req.device)):
                async with HiveLink(record) as link:
                    access = await self._access(link, worker.id)
                self.dispatched.add(worker)
                return self._assignment(record, access, warm=True, started=started)
        self.watchers.ensure(record.name)
        async with HiveLink(record) as link:
            listed = await link.call(link.workers.ListWorkers, registry_pb2.ListWorkersRequest())
            matching = [w for w in listed.workers
                        if same_model(w.model_ref, ref) and w.backend == backend_enum(backend) and w.device == req.device]  # fmt: skip
            usable = [w for w in matching if w.state in (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY) and w.slots_available > 0]
            loading = [w for w in matching if w.state == State.WORKER_STATE_LOADING]
            key = queue_key(ref, record.name, backend, req.device)
            if usable and not self.queue.waiting(key):  # nobody in line before this request
                chosen = max(usable, key=lambda w: w.slots_available - self.dispatched.pending(w))
                self.dispatched.add(chosen)
                relay.narrate("♻️", f"Warm start: worker {chosen.id} at {chosen.address} already serves {ref} "
                              f"({chosen.slots_available}/{chosen.slots_total} slots free)")  # fmt: skip
                access = await self._access(link, chosen.id)
                return self._assignment(record, access, warm=True, started=started)
            if loading and not usable:
                relay.narrate("⏳", f"Worker {loading[0].id} is already loading {ref}: joining it")
                access = await self._access(link, loading[0].id)
                return self._assignment(record, access, warm=False, started=started)
            serving = [w for w in matching if w.state in (State.WORKER_STATE_BUSY, State.WORKER_STATE_IDLE)]
            if serving:
                worker = await self._queued(key, record, ref, backend, req.device, serving, relay)
                access = await self._access(link, worker.id)
                return self._assignment(record, access, warm=True, started=started)
            busy = [w for w in matching if w.state == State.WORKER_STATE_DRAINING]
            if busy:  # draining: its slots never free for a new request
                total = sum(w.slots_total for w in busy)
                raise RbeeError(
                    "ALL_SLOTS_BUSY",
                    f"Every worker serving {ref} on {record.name} is busy ({total}/{total} slots busy)",
                    {"slots_total": total, "slots_busy": total, "node": record.name, "model": ref},
                    ["Try again in a moment", f"Or free a worker: `rbee-keeper workers list --node {record.name}`"],
                )
            relay.narrate("🧊", f"Cold start: no worker serves {ref} on {record.name} yet")
            if req.node:  # pinned: the node must fit, with the same table as a placement
                surveyed = [await survey_node(self.nodes, record, ref, relay)]
                await self._place_or_evict(ref, surveyed, *views(surveyed, ref, backend, req.device, req.slots, self.dispatched)[:2],
                                           relay, pinned=record.name)  # fmt: skip
            await hive_preflight(link, record, relay.check, self.nodes.settings, backend)
            access = await self._start(link, record, ref, backend, req, relay)
            return self._assignment(record, access, warm=False, started=started)

    async def _queued(self, key: str, record: NodeRecord, ref: str, backend: str, device: int,
                      serving: list[common_pb2.WorkerInfo], relay: EventRelay) -> common_pb2.WorkerInfo:  # fmt: skip
        """A worker of ``ref`` on the node with a slot for this request, after
        waiting in line for it (docs/queen.md, "Admission queue"). The slots
        are read from the global registry, which each worker's load report
        updates, minus what the queen handed out since that report."""
        total = sum(w.slots_total for w in serving)

        async def take() -> common_pb2.WorkerInfo | None:
            best, most = None, 0
            for cw in self.watchers.registry.list(node=record.name):
                w = cw.worker
                if (same_model(w.model_ref, ref) and w.backend == backend_enum(backend) and w.device == device
                        and w.state in (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY)):  # fmt: skip
                    free = w.slots_available - self.dispatched.pending(w)
                    if free > most:
                        best, most = w, free
            if best is not None:
                self.dispatched.add(best)
            return best

        def queued(q: Queued) -> None:
            relay.narrate("⏳", f"All {total} slots of {ref} on {record.name} are busy: queued, position {q.position} of {q.length}")

        def refuse(why: str, waited_s: float) -> RbeeError:
            return self.queue.refusal(ref, total, why, waited_s, record.name)

        got = await self.queue.admit(key, ref, take, refuse, queued)
        w = got.slot
        if got.queued:
            relay.narrate("🎟️", f"A slot of {ref} freed after {got.waited_s:.1f}s in the queue: worker {w.id} at {w.address}")
        else:
            relay.narrate("♻️", f"Warm start: worker {w.id} at {w.address} already serves {ref}")
        return w

    async def fit(self, req: tasks_pb2.FitModelRequest, relay: EventRelay) -> tasks_pb2.FitModelResponse:
        """Each node's estimate, free memory and fit, and where a request would go now."""
        ref = str(parse_model_ref(req.model_ref))
        backend = _backend(req.backend)
        records = self._records(ref)
        surveyed = await asyncio.gather(*(survey_node(self.nodes, r, ref, relay) for r in records))
        nodes, warm, _ = views(surveyed, ref, backend, 0, req.slots, self.dispatched)
        reply = tasks_pb2.FitModelResponse(nodes=fit_rows(surveyed, nodes, backend, req.slots))
        try:
            chosen = place(ref, nodes, warm)
        except RbeeError:
            return reply
        reply.placed_node, reply.placement = chosen.node, chosen.narration()
        return reply

    def _records(self, ref: str) -> list[NodeRecord]:
        records = self.store.list()
        if not records:
            raise RbeeError("NODE_NOT_FOUND", "No node is registered with the queen: there is nowhere to run the model",
                            {"model": ref}, ["Register one: `rbee-keeper setup add-node --name NAME --local`"])  # fmt: skip
        return records

    async def placement(self, ref: str, backend: str, device: int, slots: int, relay: EventRelay) -> tuple[Placement, list[NodeRecord], dict]:
        """Where ``ref`` goes (rbee_queen/placement.py) from every node's figures."""
        records = self._records(ref)
        surveyed = await asyncio.gather(*(survey_node(self.nodes, r, ref, relay) for r in records))
        nodes, warm, by_id = views(surveyed, ref, backend, device, slots, self.dispatched)
        return await self._place_or_evict(ref, surveyed, nodes, warm, relay), records, by_id

    async def _place_or_evict(self, ref: str, surveyed: list[NodeFigures], nodes: list[NodeView], warm: list[WarmView],
                              relay: EventRelay, pinned: str = "") -> Placement:  # fmt: skip
        """The placement; where no node fits, the least recently used idle
        workers of one node are stopped to make room (rbee_queen/eviction.py)."""
        try:
            return place(ref, nodes, warm, pinned)
        except RbeeError as err:
            if err.code != "NO_NODE_FITS" or self.evictor is None:
                raise
            roomy = await self.evictor.make_room(surveyed, nodes, ref, relay)
            if roomy is None:
                raise
            return place(ref, roomy, warm, pinned)

    async def _place(self, ref: str, backend: str, req: tasks_pb2.SubmitInferenceRequest,
                     relay: EventRelay) -> tuple[NodeRecord, common_pb2.WorkerInfo | None]:  # fmt: skip
        """The node (and warm worker, if any) the placement chooses, narrated with its table."""
        chosen, records, by_id = await self.placement(ref, backend, req.device, req.slots, relay)
        relay.narrate("🧭", chosen.narration())
        record = next(r for r in records if r.name == chosen.node)
        return record, by_id.get(chosen.worker_id) if chosen.worker_id else None

    async def _access(self, link: HiveLink, worker_id: str) -> registry_pb2.WorkerAccess:
        reply = await link.call(link.workers.GetWorkerAccess, registry_pb2.GetWorkerAccessRequest(worker_id=worker_id))
        return reply.access

    async def _start(self, link: HiveLink, record: NodeRecord, ref: str, backend: str,
                     req: tasks_pb2.SubmitInferenceRequest, relay: EventRelay) -> registry_pb2.WorkerAccess:  # fmt: skip
        request = registry_pb2.StartWorkerRequest(model_ref=ref, backend=backend_enum(backend), device=req.device, slots=req.slots,
                                                  queen_keep_alive=self.keepalive is not None)  # fmt: skip
        call = link.workers.StartWorker(request, metadata=link.md, timeout=START_WORKER_TIMEOUT_S)
        access = None
        try:
            async for msg in call:
                if msg.HasField("event"):
                    relay.relay(msg.event)
                elif msg.HasField("started"):
                    access = msg.started
        except grpc.RpcError as err:
            raise from_rpc_error(err, link.address) from None
        finally:
            call.cancel()
        if access is None:
            raise RbeeError("HIVE_UNREACHABLE", f"The hive on {record.name} ended StartWorker without a worker",
                            {"node": record.name, "hive": link.address})  # fmt: skip
        return access

    def _assignment(self, record: NodeRecord, access: registry_pb2.WorkerAccess, warm: bool, started: float) -> tasks_pb2.WorkerAssignment:
        worker = common_pb2.WorkerInfo()
        worker.CopyFrom(access.worker)
        worker.address = reachable_address(record, worker.address)
        # The name the keeper checks the worker's certificate against: below
        # this node's identity, whatever the hive said (rbee/tls_identity.py).
        worker.tls_name = worker_identity(tls_name(record), worker.id) if worker.tls and record.tls else ""
        return tasks_pb2.WorkerAssignment(
            node=record.name, worker=worker, api_key=access.api_key, warm=warm,
            queen_ms=int((time.monotonic() - started) * 1000),
        )  # fmt: skip
