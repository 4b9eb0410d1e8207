"""Narration and progress of one provisioning operation.

The daemon prints narration on its stdout (its log); every listener (each
client stream following the operation) receives narration and progress as
``rbee.v1.Event`` messages, so relaying is forwarding.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from rbee.narration import Narrator, event, progress_event
from rbee.v1 import common_pb2

log = logging.getLogger(__name__)

ACTOR = "rbee-hive"
Listener = Callable[[common_pb2.Event], None]


class Reporter:
    def __init__(self, narrator: Narrator | None = None, actor: str = ACTOR) -> None:
        self._narrator = narrator
        self.actor = narrator.actor if narrator is not None else actor
        self._listeners: list[Listener] = []
        self.last_progress: common_pb2.ProgressEvent | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def narrate(self, emoji: str, message: str, level: str = "info") -> common_pb2.NarrationEvent:
        if self._narrator is not None:
            ev = self._narrator(emoji, message, level)
        else:
            ev = event(self.actor, emoji, message, level)
            log.info("%s %s", emoji, message)
        self._publish(common_pb2.Event(narration=ev))
        return ev

    __call__ = narrate  # a Reporter is a narrate(emoji, message) callable too

    def progress(
        self, stage: str, done: int, total: int, rate: float = 0.0, message: str = "", unit: str = "bytes"
    ) -> None:
        ev = progress_event(stage, max(0, int(done)), max(0, int(total)), unit=unit, rate=rate, message=message)
        self.last_progress = ev
        self._publish(common_pb2.Event(progress=ev))

    def _publish(self, ev: common_pb2.Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(ev)
            except Exception:  # one broken listener must not stop the operation
                log.exception("event listener failed")


class EventQueue:
    """One client's view of an operation. Progress coalesces: a slow client
    gets the latest figures, not a backlog; narration is never dropped."""

    _END = object()

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, item: object) -> None:
        if (
            isinstance(item, common_pb2.Event)
            and item.HasField("progress")
            and self._items
            and isinstance(self._items[-1], common_pb2.Event)
            and self._items[-1].HasField("progress")
        ):
            self._items[-1] = item
        else:
            self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._items.append(self._END)
        self._ready.set()

    async def get(self) -> object | None:
        """Next item, or None once closed."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        return None if item is self._END else item
