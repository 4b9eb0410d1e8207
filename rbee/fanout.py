"""One subscriber's queue in a fan-out (a hive's log followers and worker
watchers, a worker's loading-progress subscribers). Publishers never wait,
so an unbounded queue would let a follower that stops reading grow the
daemon's memory without end. This queue holds at most ``limit`` items; a
follower that falls that far behind is dropped: its queue is emptied at once
and its next read raises SLOW_FOLLOWER naming the bound, so its stream ends
with a clear error instead of costing memory."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from rbee.errors import RbeeError

T = TypeVar("T")
_DROPPED = object()


class Subscription(Generic[T]):
    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.what = what
        self.dropped = False
        self._queue: asyncio.Queue = asyncio.Queue()

    def offer(self, item: T) -> None:
        """Queue ``item`` (never waits); past the bound, drop this follower."""
        if self.dropped:
            return
        if self._queue.qsize() >= self.limit:
            self.dropped = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_DROPPED)
            return
        self._queue.put_nowait(item)

    def _check(self, item: object) -> T:
        if item is _DROPPED:
            self._queue.put_nowait(_DROPPED)  # every later read says so too
            raise slow_follower(self.what, self.limit)
        return item  # type: ignore[return-value]

    async def get(self) -> T:
        return self._check(await self._queue.get())

    def get_nowait(self) -> T:
        return self._check(self._queue.get_nowait())

    def empty(self) -> bool:
        return self._queue.empty()

    def qsize(self) -> int:
        return self._queue.qsize()


def slow_follower(what: str, limit: int) -> RbeeError:
    return RbeeError(
        "SLOW_FOLLOWER",
        f"This {what} fell {limit} items behind and was dropped: it read more slowly than they came",
        {"follower": what, "limit": str(limit)},
        ["Follow again (the stream resumes from what is current); read the stream without pausing it"],
    )
