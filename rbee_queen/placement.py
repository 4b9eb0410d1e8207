"""Where a request for a model runs (docs/queen.md, "Placement"). Pure: the
cluster's figures come in, the choice and its reasons go out.

In order:
1. a warm worker of the model with a free slot, anywhere: the least loaded,
   counting the requests the queen dispatched to it since its last load
   report, so a burst spreads over the workers instead of landing on one;
2. else a node that already holds the model, where a worker fits;
3. else any reachable node where it fits.
Ties between nodes: more free memory, then fewer workers, then the name.

A pinned node (``--node``, ``X-Rbee-Node``) is the only candidate; when it
cannot take the model the refusal carries the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rbee.errors import RbeeError
from rbee.fit import gib


@dataclass(frozen=True)
class NodeView:
    name: str
    reachable: bool
    # RAM the node's hive reports available (bytes); None when it did not say.
    free_bytes: int | None = None
    # What a worker of the model needs there (rbee/fit.py), None when unknown.
    need_bytes: int | None = None
    holds_model: bool = False
    workers: int = 0
    # Why it is unreachable, for the table.
    problem: str = ""

    @property
    def fits(self) -> bool:
        if not self.reachable:
            return False
        if self.need_bytes is None or self.free_bytes is None:
            return True  # nothing says otherwise: the hive's own preflight decides
        return self.free_bytes >= self.need_bytes

    def line(self) -> str:
        if not self.reachable:
            return f"{self.name}: unreachable" + (f" ({self.problem})" if self.problem else "")
        if self.need_bytes is None or self.free_bytes is None:
            return f"{self.name}: fit unknown"
        spare = self.free_bytes - self.need_bytes
        if spare >= 0:
            return f"{self.name}: fits, {gib(spare)} to spare"
        return f"{self.name}: short by {gib(-spare)}"


@dataclass(frozen=True)
class WarmView:
    node: str
    worker_id: str
    slots_total: int
    # Free slots as the worker last reported them.
    slots_free: int
    # Requests the queen sent it since that report.
    dispatched: int = 0

    @property
    def free(self) -> int:
        return self.slots_free - self.dispatched

    @property
    def load(self) -> float:
        return (self.slots_total - self.free) / self.slots_total if self.slots_total else 1.0


@dataclass(frozen=True)
class Placement:
    node: str
    # The warm worker chosen, "" for a cold start on ``node``.
    worker_id: str = ""
    why: str = ""
    table: tuple[str, ...] = field(default_factory=tuple)

    def narration(self) -> str:
        lines = [line for line in self.table if not line.startswith(f"{self.node}:")]
        head = f"Placed on {self.node}: {self.why}"
        return "; ".join([head, *lines])


def _rank(view: NodeView) -> tuple:
    free = view.free_bytes if view.free_bytes is not None else -1
    return (-free, view.workers, view.name)


def table(nodes: Sequence[NodeView]) -> tuple[str, ...]:
    return tuple(v.line() for v in sorted(nodes, key=lambda v: (not v.fits, _rank(v))))


def place(model: str, nodes: Sequence[NodeView], warm: Sequence[WarmView] = (), pinned: str = "") -> Placement:
    """The placement of ``model``; NO_NODE_FITS (or NODE_NOT_FOUND for an
    unknown pinned node) with the table when there is none."""
    if pinned:
        nodes = [v for v in nodes if v.name == pinned]
        warm = [w for w in warm if w.node == pinned]
        if not nodes:
            raise RbeeError("NODE_NOT_FOUND", f"Node {pinned} is not registered with the queen", {"node": pinned},
                            [f"Register it: `rbee-keeper setup add-node --name {pinned} --local`",
                             "See the registered nodes: `rbee-keeper setup list-nodes`"])  # fmt: skip
    rows = table(nodes)
    free = [w for w in warm if w.free > 0]
    if free:
        best = min(free, key=lambda w: (w.load, -w.free, w.node, w.worker_id))
        why = f"warm worker {best.worker_id} ({best.free}/{best.slots_total} slots free)"
        return Placement(best.node, best.worker_id, why, rows)
    fitting = [v for v in nodes if v.fits]
    holders = [v for v in fitting if v.holds_model]
    for group, what in ((holders, "holds the model"), (fitting, "")):
        if group:
            best = min(group, key=_rank)
            why = best.line().split(": ", 1)[1] + (f", {what}" if what else "")
            return Placement(best.name, "", why, rows)
    summary = "; ".join(rows) or "no node is registered"
    raise RbeeError(
        "NO_NODE_FITS",
        f"{model} does not fit on node {pinned}: {summary}" if pinned else f"{model} fits on no node: {summary}",
        {"model": model, "nodes": summary, **({"node": pinned} if pinned else {})},
        ["Stop workers you no longer need: `rbee-keeper workers list`, then `rbee-keeper workers shutdown --id ID`",
         f"See the estimate per node: `rbee-keeper models fit {model}`", "Or use a smaller model"],
    )  # fmt: skip
