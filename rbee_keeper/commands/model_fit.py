"""`rbee-keeper models fit MODEL`: whether a worker of the model fits on each
node, as the queen's placement sees it (docs/queen.md, "Fit"): what a worker
needs there (the peak a hive measured with the same settings, else the
estimate: weights, KV cache, engine), the node's free memory, fits / short
by, and where a request would be placed now."""

from __future__ import annotations

import json

from rbee.backends import backend_enum
from rbee.fit import gib
from rbee.v1 import tasks_pb2

from rbee_keeper.common import resolve_queen
from rbee_keeper.render import narrator


def _row(n: tasks_pb2.NodeFit) -> dict:
    out: dict = {"node": n.node, "reachable": n.reachable, "fits": n.fits, "holds_model": n.holds_model, "line": n.line}
    if not n.reachable:
        out["problem"] = n.problem
        return out
    out["free_bytes"] = n.free_bytes
    if n.estimated:
        estimated = n.weights_bytes + n.kv_cache_bytes + n.overhead_bytes
        out["basis"] = "measured" if n.measured else "estimate"
        out["need_bytes"] = n.need_bytes
        out["estimate"] = {"bytes": estimated, "weights_bytes": n.weights_bytes, "kv_cache_bytes": n.kv_cache_bytes,
                           "overhead_bytes": n.overhead_bytes, "dtype": n.dtype, "slots": n.slots, "context": n.context}  # fmt: skip
        if n.measured:
            out["measured"] = {"bytes": n.need_bytes, "device_bytes": n.measured_device_bytes, "dtype": n.dtype,
                               "slots": n.slots, "context": n.context}  # fmt: skip
        out["spare_bytes"] = int(n.free_bytes) - int(n.need_bytes)
    return out


def _need(n: tasks_pb2.NodeFit) -> str:
    if not n.reachable:
        return "-"
    if not n.estimated:
        return "unknown (no node holds the model yet)"
    estimated = n.weights_bytes + n.kv_cache_bytes + n.overhead_bytes
    if n.measured:
        return f"measured {gib(n.need_bytes)} ({n.dtype}, {n.slots}×{n.context}; estimate {gib(estimated)})"
    return (f"estimate {gib(n.need_bytes)} = weights {gib(n.weights_bytes)} ({n.dtype}) + KV {gib(n.kv_cache_bytes)} "
            f"({n.slots}×{n.context}) + engine {gib(n.overhead_bytes)}")  # fmt: skip


async def fit(model: str, backend: str, slots: int, queen: str | None, api_key: str | None, as_json: bool) -> int:
    from rbee_keeper.queen_client import QueenClient

    request = tasks_pb2.FitModelRequest(model_ref=model, backend=backend_enum(backend), slots=slots)
    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        reply = await client.fit_model(request)
    if as_json:
        print(json.dumps({"model": model, "placed_node": reply.placed_node, "placement": reply.placement,
                          "nodes": [_row(n) for n in reply.nodes]}))  # fmt: skip
        return 0
    rows = [("NODE", "NEED", "FREE", "FIT")]
    for n in reply.nodes:
        verdict = n.line.split(": ", 1)[1] if ": " in n.line else n.line
        rows.append((n.node, _need(n), gib(n.free_bytes) if n.reachable else "-", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if reply.placed_node:
        narrator()("🧭", reply.placement)
    else:
        narrator()("⚠️", f"{model} fits on no node now")
    return 0
