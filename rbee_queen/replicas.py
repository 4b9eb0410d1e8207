"""The reconcile loop's decisions for a deployment (docs/queen.md,
"Replicas"), pure: what runs and what the wish says come in, what to do goes
out. rbee_queen/reconcile.py does it.

- Which workers are a deployment's replicas: workers of its model and
  backend, on its allowed nodes, loading, idle or busy (a draining, failed or
  stopped worker is on its way out).
- Where a missing replica goes: a node where a worker fits (the placement's
  figures and table, rbee_queen/placement.py), the one with the fewest
  replicas of the model first, so replicas spread over the nodes; then a node
  that holds the model; then more free memory, fewer workers, the name.
- When it starts: a replica lost after the deployment was complete waits
  ``base`` seconds, and each further start while it has not stayed complete
  for ``reset_after`` doubles the wait, up to ``cap`` (capped exponential
  backoff, as a crash-looping worker would otherwise be restarted without
  end). The first fill after a deploy (or a queen start) waits for nothing.
- Which extras stop when more run than wanted (a smaller --replicas, a node
  that came back after its replica was placed elsewhere): not busy ones, from
  the node with the most replicas, loading before idle, never a busy one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rbee.backends import backend_enum
from rbee.errors import RbeeError
from rbee.v1 import common_pb2

from rbee_queen.deployments import Deployment
from rbee_queen.placement import NodeView, Placement, _rank, place, table

State = common_pb2.WorkerState
LIVE = (State.WORKER_STATE_LOADING, State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY)
READY = (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY)


@dataclass(frozen=True)
class Replica:
    node: str
    worker_id: str
    state: int

    @property
    def label(self) -> str:
        return f"{self.node}/{self.worker_id}"


def replicas_of(d: Deployment, allowed: Iterable[str], workers: Iterable[tuple[str, common_pb2.WorkerInfo]], same_model) -> list[Replica]:
    """The live workers of ``d`` among ``(node, worker)`` pairs."""
    names = set(allowed)
    return sorted((Replica(node, w.id, w.state) for node, w in workers
                   if node in names and w.state in LIVE and (w.backend or common_pb2.BACKEND_CPU) == backend_enum(d.backend) and same_model(w.model_ref, d.model_ref)),
                  key=lambda r: (r.node, r.worker_id))  # fmt: skip


def allowed_nodes(d: Deployment, registered: Sequence[str]) -> list[str]:
    """The registered nodes ``d`` may use (its --nodes that still exist, else all)."""
    if not d.nodes:
        return list(registered)
    return [n for n in d.nodes if n in registered]


def place_replica(model: str, nodes: Sequence[NodeView], per_node: Counter) -> Placement:
    """Where the next replica of ``model`` goes; NO_NODE_FITS with the table when nowhere."""
    fitting = [v for v in nodes if v.fits]
    if not fitting:
        place(model, nodes)  # raises NO_NODE_FITS with the table
        raise RbeeError("NO_NODE_FITS", f"{model} fits on no node", {"model": model})  # pragma: no cover
    best = min(fitting, key=lambda v: (per_node[v.name], not v.holds_model, _rank(v)))
    why = best.line().split(": ", 1)[1]
    held = per_node[best.name]
    why += f", {held} replica{'s' if held != 1 else ''} of it there already" if held else ", none of its replicas there yet"
    return Placement(best.name, "", why, table(nodes))


def extras(running: Sequence[Replica], wanted: int) -> list[Replica]:
    """The replicas to stop so that ``wanted`` remain; busy ones are never chosen."""
    surplus = len(running) - wanted
    if surplus <= 0:
        return []
    per_node = Counter(r.node for r in running)
    order = {State.WORKER_STATE_LOADING: 0, State.WORKER_STATE_IDLE: 1}
    candidates = sorted((r for r in running if r.state in order), key=lambda r: (-per_node[r.node], order[r.state], r.label))
    chosen: list[Replica] = []
    for r in candidates:
        if len(chosen) == surplus:
            break
        chosen.append(r)
        per_node[r.node] -= 1
    return chosen


class Backoff:
    """When the next start of a deployment's replicas may happen (monotonic seconds)."""

    def __init__(self, base_s: float, cap_s: float, reset_after_s: float) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.reset_after_s = reset_after_s
        # Starts since the deployment was last complete for reset_after_s.
        self.streak = 0
        self.not_before = 0.0
        self.complete_since: float | None = None
        # The first fill (after a deploy or a queen start) does not count.
        self.fresh = True

    def delay(self) -> float:
        return min(self.cap_s, self.base_s * (2**self.streak))

    def complete(self, now: float) -> None:
        if self.complete_since is None:
            self.complete_since = now
        elif now - self.complete_since >= self.reset_after_s:
            self.streak = 0

    def lost(self, now: float) -> float:
        """The deployment fell short after being complete: the wait before a restart."""
        self.complete_since = None
        self.fresh = False
        self.not_before = max(self.not_before, now + self.delay())
        return self.not_before - now

    def due(self, now: float) -> bool:
        return now >= self.not_before

    def started(self, now: float) -> None:
        """A start pass ran (whatever came of it): the next one waits longer."""
        if not self.fresh:
            self.streak += 1
        self.fresh = False
        self.complete_since = None
        self.not_before = now + self.delay()

    @property
    def attempt(self) -> int:
        return self.streak + 1
