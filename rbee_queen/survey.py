"""The cluster's figures for a placement (rbee_queen/placement.py): each
node's hive made ready and asked for its free memory (GetResources), its
models (ListModels, with the figures of the fit estimate, rbee/fit.py) and
its workers; and the requests the queen dispatched to each warm worker since
its last load report (docs/queen.md, "Placement")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from rbee.backends import backend_enum
from rbee.errors import RbeeError
from rbee.fit import Need, listing_need
from rbee.modelref import parse_model_ref
from rbee.v1 import common_pb2, preflight_pb2, provisioning_pb2, registry_pb2, tasks_pb2

from rbee_queen.hives import HiveLink
from rbee_queen.nodes.manager import NodeManager
from rbee_queen.nodes.relay import EventRelay
from rbee_queen.nodes.store import NodeRecord
from rbee_queen.placement import NodeView, WarmView

log = logging.getLogger(__name__)
State = common_pb2.WorkerState
READY = (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY)
SURVEY_CALL_TIMEOUT_S = 10.0


# Model references longer than this are compared as they are written (parse_model_ref refuses them anyway).
CANONICAL_CACHE_MAX_LEN = 1100


@lru_cache(maxsize=4096)
def _canonical_cached(text: str) -> str:
    try:
        return str(parse_model_ref(text))
    except RbeeError:
        return text


def canonical(text: str) -> str:
    """``text`` as parse_model_ref writes it; as it is when it does not parse."""
    return _canonical_cached(text) if len(text) <= CANONICAL_CACHE_MAX_LEN else text


def same_model(a: str, b: str) -> bool:
    return a == b or canonical(a) == canonical(b)


class LogRelay(EventRelay):
    """For a survey no stream follows (the front door before its cold start
    exists, FitModel): the lines go to the queen's log only."""

    def _wrap_event(self, ev: common_pb2.Event) -> None:
        return None

    def _wrap_result(self, result):  # pragma: no cover - run() is not used here
        return result


@dataclass
class NodeFigures:
    record: NodeRecord
    error: str = ""
    free_bytes: int | None = None
    model: provisioning_pb2.ModelEntry | None = None
    # Every model the node holds (what an eviction frees, rbee_queen/eviction.py).
    models: list[provisioning_pb2.ModelEntry] = field(default_factory=list)
    workers: list[common_pb2.WorkerInfo] = field(default_factory=list)
    # The node's workers that can take a request now, by (model, backend,
    # device): built at the first placement that reads these figures, which
    # do not change once surveyed. A placement then reads the model's own
    # workers, not every worker of the cluster.
    _ready: dict[tuple[str, int, int], list[common_pb2.WorkerInfo]] | None = field(default=None, repr=False, compare=False)
    # What a worker needs here (model_need), by (backend, slots): the same figures, the same answer.
    _needs: dict[tuple[str, int], Need | None] = field(default_factory=dict, repr=False, compare=False)

    def ready_workers(self, ref: str, backend: str, device: int) -> list[common_pb2.WorkerInfo]:
        """Workers of ``ref`` (canonical) on ``backend``:``device``, idle or busy, with a free slot."""
        if self._ready is None:
            written: dict[tuple[str, int, int], list[common_pb2.WorkerInfo]] = {}
            for w in self.workers:
                if w.slots_available > 0 and w.state in READY:
                    written.setdefault((w.model_ref, w.backend, w.device), []).append(w)
            # One canonical form per reference as written, not per worker.
            index: dict[tuple[str, int, int], list[common_pb2.WorkerInfo]] = {}
            for (model, b, d), found in written.items():
                index.setdefault((canonical(model), b, d), []).extend(found)
            self._ready = index
        return self._ready.get((ref, backend_enum(backend), device), [])

    def need(self, surveyed: Sequence[NodeFigures], backend: str, slots: int,
             fallback: provisioning_pb2.ModelEntry | None = None) -> Need | None:  # fmt: skip
        """``model_need`` for this node, computed once per (backend, slots)."""
        if (backend, slots) not in self._needs:
            self._needs[(backend, slots)] = model_need(surveyed, self, backend, slots, fallback)
        return self._needs[(backend, slots)]


class Dispatched:
    """Requests handed to each worker since its last load report: a report
    (free slots, load, last activity) that changed resets the count."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple, int]] = {}

    @staticmethod
    def _report(w: common_pb2.WorkerInfo) -> tuple:
        return (w.slots_available, w.last_activity_unix_ms, w.load.running_requests, w.load.slots_busy)

    def pending(self, w: common_pb2.WorkerInfo) -> int:
        seen = self._seen.get(w.id)
        return seen[1] if seen is not None and seen[0] == self._report(w) else 0

    def add(self, w: common_pb2.WorkerInfo) -> None:
        self._seen[w.id] = (self._report(w), self.pending(w) + 1)


async def survey_node(nodes: NodeManager, record: NodeRecord, ref: str, relay: EventRelay) -> NodeFigures:
    figures = NodeFigures(record)
    try:
        await nodes.ensure_ready(record, relay)
        async with HiveLink(record) as link:
            res, models, listed = await asyncio.gather(
                link.call(link.preflight.GetResources, preflight_pb2.GetResourcesRequest(), timeout=SURVEY_CALL_TIMEOUT_S),
                link.call(link.provisioning.ListModels, provisioning_pb2.ListModelsRequest(), timeout=SURVEY_CALL_TIMEOUT_S),
                link.call(link.workers.ListWorkers, registry_pb2.ListWorkersRequest(), timeout=SURVEY_CALL_TIMEOUT_S),
            )  # fmt: skip
    except RbeeError as err:
        figures.error = err.code
        log.info("placement: %s not surveyed: %s", record.name, err)
        return figures
    figures.free_bytes = res.ram_available_bytes
    figures.models = list(models.models)
    figures.model = next((m for m in figures.models if same_model(m.model_ref, ref)), None)
    figures.workers = list(listed.workers)
    return figures


def model_need(surveyed: Sequence[NodeFigures], node: NodeFigures, backend: str, slots: int,
               fallback: provisioning_pb2.ModelEntry | None = None) -> Need | None:  # fmt: skip
    """The estimate on ``node`` (from its own copy of the model, else
    ``fallback`` or another node's), replaced by what the node's hive
    measured with the same settings (rbee/fit.py ``listing_need``): another
    machine's measurement is not this one's."""
    entry = node.model or fallback or next((f.model for f in surveyed if f.model is not None), None)
    if entry is None:
        return None
    return listing_need(entry.metadata, entry.size_bytes, node.model.metadata if node.model is not None else None, backend, slots)


def views(surveyed: Sequence[NodeFigures], ref: str, backend: str, device: int, slots: int,
          dispatched: Dispatched) -> tuple[list[NodeView], list[WarmView], dict[str, common_pb2.WorkerInfo]]:  # fmt: skip
    nodes: list[NodeView] = []
    warm: list[WarmView] = []
    by_id: dict[str, common_pb2.WorkerInfo] = {}
    fallback = next((f.model for f in surveyed if f.model is not None), None)
    key = canonical(ref)
    for f in surveyed:
        if f.error:
            nodes.append(NodeView(f.record.name, False, problem=f.error))
            continue
        est = f.need(surveyed, backend, slots, fallback)
        nodes.append(NodeView(f.record.name, True, f.free_bytes, est.total if est else None, f.model is not None, len(f.workers)))
        for w in f.ready_workers(key, backend, device):
            warm.append(WarmView(f.record.name, w.id, w.slots_total, w.slots_available, dispatched.pending(w)))
            by_id[w.id] = w
    return nodes, warm, by_id


def fit_rows(surveyed: Sequence[NodeFigures], nodes: Sequence[NodeView], backend: str, slots: int) -> list[tasks_pb2.NodeFit]:
    """FitModel's rows: each node's view with the estimate or measurement it used."""
    rows = []
    for f, v in zip(surveyed, nodes):
        row = tasks_pb2.NodeFit(node=v.name, reachable=v.reachable, problem=v.problem, fits=v.fits,
                                holds_model=v.holds_model, line=v.line(), free_bytes=v.free_bytes or 0)  # fmt: skip
        required = model_need(surveyed, f, backend, slots) if v.reachable else None
        if required is not None:
            est = required.estimate
            row.estimated = True
            row.need_bytes, row.weights_bytes, row.kv_cache_bytes, row.overhead_bytes = required.total, est.weights, est.kv_cache, est.overhead
            row.dtype, row.slots, row.context = est.dtype, est.slots, est.context
            if required.measured is not None:
                row.measured, row.measured_device_bytes = True, required.measured.device_bytes
        rows.append(row)
    return rows
