"""What a spawn tells whoever follows it: narration, loading progress and
registry changes, kept from the start so a follower that joins late misses
nothing, and closed with success (loaded) or an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from rbee.errors import RbeeError
from rbee.v1 import registry_pb2

MAX_EVENTS = 5000


class EventLog:
    def __init__(self) -> None:
        self._items: list[registry_pb2.FollowWorkerResponse] = []
        self._changed = asyncio.Condition()
        self._done = False
        self._error: RbeeError | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> RbeeError | None:
        return self._error

    def _append(self, item: registry_pb2.FollowWorkerResponse) -> None:
        # The log closes once the worker is loaded, so it stays small; the
        # cap only guards against a worker that floods while loading.
        if self._done or len(self._items) >= MAX_EVENTS:
            return
        self._items.append(item)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def narration(self, ev) -> None:
        self._append(registry_pb2.FollowWorkerResponse(narration=ev))

    def progress(self, ev) -> None:
        self._append(registry_pb2.FollowWorkerResponse(progress=ev))

    def worker(self, info) -> None:
        self._append(registry_pb2.FollowWorkerResponse(worker=info))

    def finish(self, error: RbeeError | None = None) -> None:
        """Close the log: followers get what is left, then end (or the error)."""
        if self._done:
            return
        self._done = True
        self._error = error
        asyncio.get_running_loop().create_task(self._notify())

    def history(self) -> list[registry_pb2.FollowWorkerResponse]:
        """Everything logged so far."""
        return list(self._items)

    async def follow(self) -> AsyncIterator[registry_pb2.FollowWorkerResponse]:
        sent = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: sent < len(self._items) or self._done)
                batch = self._items[sent:]
                sent = len(self._items)
                done, error = self._done, self._error
            for item in batch:
                yield item
            if done and sent >= len(self._items):
                if error is not None:
                    raise error
                return
