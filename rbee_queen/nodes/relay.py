"""One queen operation's events on their way to the client: narration, check
results, relayed hive events and the final result, put on a queue by the
operation and drained by the streaming RPC. The queen's own log gets each
narration line too. ``NodeEventRelay`` speaks NodeService's messages,
``TaskRelay`` TaskService's; the operations only see narrate/relay/check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from rbee.narration import Narrator, event
from rbee.v1 import common_pb2, nodes_pb2, tasks_pb2

ACTOR = "queen-rbee"
_DONE = object()


class EventRelay:
    def __init__(self, log: Narrator) -> None:
        self._log = log
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    # -- what a stream's messages look like (subclasses) ---------------------------------

    def _wrap_event(self, ev: common_pb2.Event) -> Any:
        raise NotImplementedError

    def _wrap_result(self, result: Any) -> Any:
        raise NotImplementedError

    def _wrap_check(self, check: nodes_pb2.CheckResult) -> Any:
        """A check result as a message; by default a narration line."""
        emoji = "⚠️" if check.warning else ("✅" if check.passed else "❌")
        return self._wrap_event(common_pb2.Event(narration=event(ACTOR, emoji, check.message, _level(check))))

    # -- what operations call ------------------------------------------------------------

    def narrate(self, emoji: str, message: str, level: str = "info", actor: str = ACTOR) -> None:
        ev = event(actor, emoji, message, level)
        self._log.emit(ev)
        self._queue.put_nowait(self._wrap_event(common_pb2.Event(narration=ev)))

    def relay(self, ev: common_pb2.Event) -> None:
        """An event from further down (a hive's), forwarded as it is."""
        if ev.HasField("narration"):
            self._log.emit(ev.narration)
        self._queue.put_nowait(self._wrap_event(ev))

    def check(self, name: str, passed: bool, message: str, warning: bool = False, **details: object) -> None:
        result = nodes_pb2.CheckResult(
            name=name, passed=passed, warning=warning, message=message, details={k: str(v) for k, v in details.items()}
        )
        self._log("⚠️" if warning else ("✅" if passed else "❌"), message, _level(result))
        self._queue.put_nowait(self._wrap_check(result))

    async def run(self, work: Awaitable[Any]) -> AsyncIterator[Any]:
        """Yield the events ``work`` produces, then its result. Its error ends the
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
            yield self._wrap_result(task.result())
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
                    pass


def _level(check: nodes_pb2.CheckResult) -> str:
    return "warn" if check.warning or not check.passed else "info"


class NodeEventRelay(EventRelay):
    def _wrap_event(self, ev: common_pb2.Event) -> nodes_pb2.NodeEvent:
        return nodes_pb2.NodeEvent(event=ev)

    def _wrap_check(self, check: nodes_pb2.CheckResult) -> nodes_pb2.NodeEvent:
        return nodes_pb2.NodeEvent(check=check)

    def _wrap_result(self, result: nodes_pb2.Node) -> nodes_pb2.NodeEvent:
        return nodes_pb2.NodeEvent(node=result)


class TaskRelay(EventRelay):
    def _wrap_event(self, ev: common_pb2.Event) -> tasks_pb2.TaskEvent:
        return tasks_pb2.TaskEvent(event=ev)

    def _wrap_result(self, result: tasks_pb2.WorkerAssignment) -> tasks_pb2.TaskEvent:
        return tasks_pb2.TaskEvent(assigned=result)
