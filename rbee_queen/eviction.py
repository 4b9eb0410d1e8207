"""Eviction: room for a new model on a node that is short of memory
(docs/queen.md, "Idle memory").

When the placement finds no node where the model fits (or the pinned node
short), the queen looks for a node where stopping idle workers makes it fit:
the least recently used first, until what they free (the fit estimate of each
one's model, rbee/fit.py) covers what the node is short of. Never a worker
serving a request (busy in the registry, a slot taken, a request of the
queen's on it or a hand-out whose client has not come yet), never one marked
as needed (``KeepAlive.needed``: a replica count's workers), never one still
loading.
Among nodes, the one needing the fewest evictions, then the most free memory.

Each eviction is one narration line with what it freed: the node's free
memory measured before and after; where the figure did not move (memory not
returned yet, or figures pinned by the hive's override file) the estimate,
said as such.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rbee.backends import backend_name
from rbee.errors import RbeeError
from rbee.fit import estimate, gib
from rbee.v1 import common_pb2, preflight_pb2, registry_pb2

from rbee_queen.hives import HiveLink
from rbee_queen.keepalive import KeepAlive, describe
from rbee_queen.nodes.relay import EventRelay
from rbee_queen.nodes.store import NodeStore
from rbee_queen.placement import NodeView
from rbee_queen.survey import NodeFigures, same_model

State = common_pb2.WorkerState
# How long a worker may drain when it is stopped (it is idle: nothing to drain).
STOP_TIMEOUT_S = 10
# How long a hive may take to put a worker to sleep (its weights copied to CPU memory).
SLEEP_TIMEOUT_S = 150


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    model: str
    idle_s: float
    # What stopping it frees by the estimate; None when not known.
    bytes: int | None


def lru_choice(short_bytes: int, candidates: Sequence[Candidate]) -> list[Candidate] | None:
    """The least recently used candidates whose estimates cover ``short_bytes``
    (longest idle first); None when all of them together do not."""
    chosen: list[Candidate] = []
    freed = 0
    for c in sorted(candidates, key=lambda c: (-c.idle_s, c.worker_id)):
        if freed >= short_bytes:
            break
        if not c.bytes:
            continue
        chosen.append(c)
        freed += c.bytes
    return chosen if freed >= short_bytes else None


@dataclass(frozen=True)
class Plan:
    node: str
    need_bytes: int
    free_bytes: int
    evict: tuple[Candidate, ...]


def choose_node(plans: Sequence[Plan]) -> Plan | None:
    return min(plans, key=lambda p: (len(p.evict), -p.free_bytes, p.node), default=None)


def hive_stopper(store: NodeStore) -> Callable:
    """Stop a worker through its node's hive (ShutdownWorker)."""

    async def stop(node: str, worker_id: str) -> registry_pb2.ShutdownWorkerResponse:
        async with HiveLink(store.get(node)) as link:
            request = registry_pb2.ShutdownWorkerRequest(worker_id=worker_id, timeout_ms=STOP_TIMEOUT_S * 1000)
            return await link.call(link.workers.ShutdownWorker, request, timeout=STOP_TIMEOUT_S + 30)

    return stop


def hive_sleeper(store: NodeStore) -> Callable:
    """Put a worker to sleep through its node's hive (SleepWorker; idle sleep, rbee_queen/keepalive.py)."""

    async def sleep(node: str, worker_id: str) -> registry_pb2.SleepWorkerResponse:
        async with HiveLink(store.get(node)) as link:
            request = registry_pb2.SleepWorkerRequest(worker_id=worker_id)
            return await link.call(link.workers.SleepWorker, request, timeout=SLEEP_TIMEOUT_S)

    return sleep


class Evictor:
    def __init__(self, store: NodeStore, keepalive: KeepAlive) -> None:
        self.store = store
        self.keepalive = keepalive
        self.stop = hive_stopper(store)

    def _worker_bytes(self, figures: NodeFigures, w: common_pb2.WorkerInfo) -> int | None:
        entry = next((m for m in figures.models if same_model(m.model_ref, w.model_ref)), None)
        if entry is None or w.backend not in common_pb2.Backend.values():  # not known: a newer hive's backend
            return None
        return estimate(dict(entry.metadata), entry.size_bytes, backend_name(w.backend) or "cpu", w.slots_total).total

    def candidates(self, figures: NodeFigures) -> list[Candidate]:
        out = []
        for w in figures.workers:
            if w.state != State.WORKER_STATE_IDLE or w.slots_available < w.slots_total or w.load.running_requests:
                continue
            if self.keepalive.in_use(w.id) or self.keepalive.is_needed(figures.record.name, w):
                continue
            idle_s = max(0.0, self.keepalive.clock() - self.keepalive.idle_since(w))
            out.append(Candidate(w.id, w.model_ref, idle_s, self._worker_bytes(figures, w)))
        return out

    def plan(self, surveyed: Sequence[NodeFigures], nodes: Sequence[NodeView]) -> Plan | None:
        plans = []
        for f, v in zip(surveyed, nodes):
            if not v.reachable or v.fits or v.need_bytes is None or v.free_bytes is None:
                continue
            chosen = lru_choice(v.need_bytes - v.free_bytes, self.candidates(f))
            if chosen:
                plans.append(Plan(v.name, v.need_bytes, v.free_bytes, tuple(chosen)))
        return choose_node(plans)

    async def _free_bytes(self, node: str) -> int | None:
        try:
            async with HiveLink(self.store.get(node)) as link:
                res = await link.call(link.preflight.GetResources, preflight_pb2.GetResourcesRequest(), timeout=10)
        except RbeeError:
            return None
        return res.ram_available_bytes

    async def make_room(self, surveyed: Sequence[NodeFigures], nodes: Sequence[NodeView], ref: str,
                        relay: EventRelay) -> list[NodeView] | None:  # fmt: skip
        """Evict by the plan; the node views with what it freed, for the
        caller to place again; None when there is no plan or it failed."""
        plan = self.plan(surveyed, nodes)
        if plan is None:
            return None
        before = plan.free_bytes
        measured = estimated = 0
        for c in plan.evict:
            try:
                await self.stop(plan.node, c.worker_id)
            except RbeeError as err:
                if err.code != "WORKER_NOT_FOUND":
                    relay.narrate("⚠️", f"Could not evict worker {c.worker_id} on {plan.node}: {err.code}: {err.message}", "warn")
                    return None
            after = await self._free_bytes(plan.node)
            freed = (after - before) if after is not None else 0
            if freed > 0:
                what = f"{gib(freed)} freed"
            else:
                what = f"{gib(c.bytes or 0)} freed by the estimate (the node's free memory has not risen yet)"
            before = after if after is not None else before
            measured += max(0, freed)
            estimated += c.bytes or 0
            relay.narrate("🧹", f"Evicted idle worker {c.worker_id} (model {c.model}, idle {describe(c.idle_s)}) "
                          f"on node {plan.node} to make room for {ref}: {what}")  # fmt: skip
        return credit(nodes, plan.node, measured or estimated, len(plan.evict))


def credit(nodes: Sequence[NodeView], node: str, freed_bytes: int, stopped: int) -> list[NodeView]:
    """``nodes`` with ``node``'s free memory raised by what its evictions freed
    (measured, else by the estimate) and its worker count lowered."""
    out = []
    for v in nodes:
        if v.name == node and v.free_bytes is not None:
            v = NodeView(v.name, v.reachable, v.free_bytes + freed_bytes, v.need_bytes, v.holds_model,
                         max(0, v.workers - stopped), v.problem)  # fmt: skip
        out.append(v)
    return out
