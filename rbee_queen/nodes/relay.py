"""One node operation's events on their way to the client: narration, check
results and the final node, put on a queue by the operation and drained by the
streaming RPC. The queen's own log gets each narration line too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from rbee.narration import Narrator, event
from rbee.v1 import common_pb2, nodes_pb2

ACTOR = "queen-rbee"
_DONE = object()


class NodeEventRelay:
    def __init__(self, log: Narrator) -> None:
        self._log = log
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def narrate(self, emoji: str, message: str, level: str = "info", actor: str = ACTOR) -> None:
        ev = event(actor, emoji, message, level)
        self._log.emit(ev)
        self._queue.put_nowait(nodes_pb2.NodeEvent(event=common_pb2.Event(narration=ev)))

    def relay(self, ev: common_pb2.Event) -> None:
        """An event from further down (a hive's), forwarded as it is."""
        if ev.HasField("narration"):
            self._log.emit(ev.narration)
        self._queue.put_nowait(nodes_pb2.NodeEvent(event=ev))

    def check(self, name: str, passed: bool, message: str, warning: bool = False, **details: object) -> None:
        emoji = "⚠️" if warning else ("✅" if passed else "❌")
        self._log(emoji, message, "warn" if warning or not passed else "info")
        self._queue.put_nowait(
            nodes_pb2.NodeEvent(
                check=nodes_pb2.CheckResult(
                    name=name, passed=passed, warning=warning, message=message,
                    details={k: str(v) for k, v in details.items()},
                )  # fmt: skip
            )
        )

    async def run(self, work: Awaitable[nodes_pb2.Node]) -> AsyncIterator[nodes_pb2.NodeEvent]:
        """Yield the events ``work`` produces, then its node. Its error ends the
        stream (after the events before it); a client that goes away cancels it."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _t: self._queue.put_nowait(_DONE))
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    break
                yield item
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not _DONE:
                    yield item
            node = task.result()
            yield nodes_pb2.NodeEvent(node=node)
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
                    pass
