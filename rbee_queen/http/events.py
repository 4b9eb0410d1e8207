"""The web page's one live feed (docs/web.md): server-sent events.

The stream opens with a ``snapshot`` (nodes, workers, models, recent
activity) and then sends what changed as it changes: ``workers`` on every
change of the global worker registry (the hives push those to the queen),
``entry``/``line``/``progress`` from the activity record (tasks, downloads),
``models`` of a node whose catalog changed, and ``nodes`` when a node's
state or resources differ from what was last sent (read every few seconds
here, on the server: the page never polls). A comment line every
``KEEPALIVE_S`` keeps proxies from closing an idle stream.

Changes that arrive together go out together: after a wake-up the writer
drains everything ready before it writes (as ``rbee_worker/stream.py`` does
for tokens), so a burst of registry changes is one ``workers`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

from rbee.errors import RbeeError
from rbee_queen.http import cluster_view

NODES_EVERY_S = 3.0
KEEPALIVE_S = 15.0


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _snapshot(queen: Any) -> dict:
    # Activity and workers first, with no await between subscribing and reading
    # them: every later change is in the queues, none is in both.
    snapshot = {"activity": queen.tasks.activity.recent(), "workers": cluster_view.workers_view(queen)}
    snapshot["nodes"], snapshot["models"] = await asyncio.gather(cluster_view.nodes_view(queen), cluster_view.models_view(queen))
    return snapshot


async def cluster_events(queen: Any) -> AsyncIterator[bytes]:
    activity = queen.tasks.activity
    with queen.registry.listen() as changed, activity.subscribe() as changes:
        snapshot = await _snapshot(queen)
        yield sse("snapshot", snapshot)
        last_nodes = snapshot["nodes"]
        nodes_task: asyncio.Task | None = None
        wait_changed = asyncio.ensure_future(changed.wait())
        wait_activity = asyncio.ensure_future(changes.get())
        try:
            loop = asyncio.get_running_loop()
            next_nodes = loop.time() + NODES_EVERY_S
            while True:
                if nodes_task is None:
                    nodes_task = asyncio.ensure_future(_nodes_later(queen, max(0.0, next_nodes - loop.time())))
                done, _ = await asyncio.wait({wait_changed, wait_activity, nodes_task}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                out: list[bytes] = []
                if wait_changed in done:
                    changed.clear()
                    out.append(sse("workers", cluster_view.workers_view(queen)))
                    wait_changed = asyncio.ensure_future(changed.wait())
                if wait_activity in done:
                    items = [wait_activity.result()]
                    while not changes.empty():
                        items.append(changes.get_nowait())
                    for kind, data in items:
                        if kind == "models":
                            try:
                                record = await asyncio.to_thread(queen.store.get, data["node"])
                            except RbeeError:
                                continue  # the node was removed meanwhile
                            data = {"node": data["node"], **await cluster_view.node_models(queen, record)}
                        out.append(sse(kind, data))
                    wait_activity = asyncio.ensure_future(changes.get())
                if nodes_task in done:
                    nodes = nodes_task.result()
                    nodes_task = None
                    next_nodes = loop.time() + NODES_EVERY_S
                    if nodes != last_nodes:
                        last_nodes = nodes
                        out.append(sse("nodes", nodes))
                if out:
                    yield b"".join(out)
        finally:
            for task in (wait_changed, wait_activity, nodes_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task


class _SharedNodes:
    """One reading of the nodes for every open page: each stream asks every few
    seconds, the hives are asked at most once per ``max_age``."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.at = 0.0
        self.value: list[dict] | None = None


_shared: dict[int, _SharedNodes] = {}


async def shared_nodes(queen: Any, max_age: float = NODES_EVERY_S * 0.8) -> list[dict]:
    shared = _shared.setdefault(id(queen), _SharedNodes())
    loop = asyncio.get_running_loop()
    async with shared.lock:
        if shared.value is None or loop.time() - shared.at >= max_age:
            shared.value = await cluster_view.nodes_view(queen)
            shared.at = loop.time()
        return copy.deepcopy(shared.value)


async def _nodes_later(queen: Any, delay: float) -> list[dict]:
    await asyncio.sleep(delay)
    nodes = await shared_nodes(queen)
    for node in nodes:
        # Uptime changes every time; it is not a change of the node.
        node.pop("hive_uptime_ms", None)
    return nodes


async def log_events(lines: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Log lines as ``line`` events, several per write when they come in a burst."""
    queue: asyncio.Queue = asyncio.Queue(10000)
    done = object()
    failure: list[BaseException] = []

    async def pump() -> None:
        try:
            async for item in lines:
                await queue.put(item)
        except Exception as exc:  # noqa: BLE001 - sent to the page as an error event
            failure.append(exc)
        finally:
            await queue.put(done)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"
                continue
            batch = [item]
            while not queue.empty():
                batch.append(queue.get_nowait())
            out = [sse("line", i) for i in batch if i is not done]
            if out:
                yield b"".join(out)
            if any(i is done for i in batch):
                if failure:
                    yield sse("failed", _error(failure[0]))
                return
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _error(exc: BaseException) -> dict:
    from rbee.errors import RbeeError

    from rbee_queen.activity import error_dict

    if isinstance(exc, RbeeError):
        return error_dict(exc)
    return {"code": "INTERNAL", "message": "The log stream failed: see the queen's log", "details": {}, "suggestions": []}
