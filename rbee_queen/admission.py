"""The admission queue (docs/queen.md, "Admission queue"): when every slot
of a model's workers is busy, a request waits in line instead of being
refused, and the first slot that frees goes to the request at the head.

One line per key (a model, or a model on a pinned node), first come first
served: a request that arrives while others wait joins the line even when a
slot looks free, so it cannot overtake them. Only the head of a line looks
for a slot; it looks again when told a slot may have freed: a change in the
global worker registry (a worker's load report, rbee_queen/workers.py) or
``wake(model)`` (a request the queen routed itself finished). When the head
leaves, with a slot, refused or cancelled, the next one looks at once.

Bounds: at most ``max_length`` requests wait in one line; one waits at most
``max_wait_s``. Past either, the request is refused at once with the error
the caller builds (ALL_SLOTS_BUSY). A waiter whose client leaves is
cancelled, which takes it out of the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import ContextManager, Generic, TypeVar

from rbee.errors import RbeeError

T = TypeVar("T")

DEFAULT_QUEUE_LENGTH = 64
DEFAULT_QUEUE_WAIT_S = 60.0


@dataclass(eq=False)
class Ticket:
    key: str
    model: str
    joined: float = field(default_factory=time.monotonic)
    # Set when this ticket should look again: it moved up the line, or (as the head) a slot may have freed.
    turn: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Queued:
    """What a request is told when it joins a line."""

    position: int
    length: int


@dataclass(frozen=True)
class Admitted(Generic[T]):
    slot: T
    # Seconds spent in line (0 when a slot was free on arrival).
    waited_s: float = 0.0
    queued: bool = False


@contextlib.contextmanager
def _never() -> Iterator[asyncio.Event]:
    yield asyncio.Event()


class AdmissionQueue:
    def __init__(self, max_length: int = DEFAULT_QUEUE_LENGTH, max_wait_s: float = DEFAULT_QUEUE_WAIT_S,
                 changes: Callable[[], ContextManager[asyncio.Event]] | None = None) -> None:  # fmt: skip
        """``changes()``: an event set whenever a slot may have freed anywhere
        (the registry's ``listen``); the queue clears it."""
        self.max_length = max_length
        self.max_wait_s = max_wait_s
        self._changes = changes or _never
        self._lines: dict[str, deque[Ticket]] = {}
        # Requests waiting now, per model; a model once queued stays listed (at 0) for the metrics.
        self._depth: dict[str, int] = {}

    def waiting(self, key: str) -> int:
        """Requests in line for ``key`` now."""
        line = self._lines.get(key)
        return len(line) if line else 0

    def depths(self) -> dict[str, int]:
        """Requests waiting now per model (for the metrics)."""
        return dict(self._depth)

    def refusal(self, model: str, slots_total: int, why: str, waited_s: float, node: str = "") -> RbeeError:
        """ALL_SLOTS_BUSY for a request the queue cannot take (``why``: "full"
        or "wait"), with the figures and the settings that bound it."""
        where = f" on {node}" if node else ""
        if why == "full":
            reason = (f"and {self.max_length} requests are queued already (--queue-length {self.max_length})"
                      if self.max_length else "and the queen queues no requests (--queue-length 0)")  # fmt: skip
        else:
            reason = f"and none freed within {waited_s:.0f}s in the queue (--queue-wait {self.max_wait_s:g}s)"
        details = {"model": model, "slots_total": slots_total, "slots_busy": slots_total, "queued": self.waiting_for(model),
                   "queue_length": self.max_length, "queue_wait_s": self.max_wait_s, "waited_s": round(waited_s, 3)}  # fmt: skip
        if node:
            details["node"] = node
        return RbeeError(
            "ALL_SLOTS_BUSY",
            f"All {slots_total} slots of {model}{where} are busy {reason}",
            details,
            ["Try again in a moment",
             "Let more requests wait: `queen-rbee daemon --queue-length 128 --queue-wait 120s`",
             f"See the model's workers: `rbee-keeper workers list --model {model}`"],
        )  # fmt: skip

    def waiting_for(self, model: str) -> int:
        return self._depth.get(model, 0)

    def wake(self, model: str | None = None) -> None:
        """A slot of ``model`` (None: of any model) may have freed: each line's head looks again."""
        for line in list(self._lines.values()):
            if line and (model is None or line[0].model == model):
                line[0].turn.set()

    async def admit(self, key: str, model: str, take: Callable[[], Awaitable[T | None]],
                    refuse: Callable[[str, float], RbeeError],
                    on_queued: Callable[[Queued], None] | None = None) -> Admitted[T]:  # fmt: skip
        """A slot from ``take()`` (None: none free now), at once when it has
        one and nobody waits for ``key``, else after waiting in line.
        ``refuse(why, waited_s)`` builds the error raised when the line is
        full (why "full") or the wait is over (why "wait")."""
        if not self.waiting(key):
            slot = await take()
            if slot is not None:
                return Admitted(slot)
        line = self._lines.setdefault(key, deque())
        if len(line) >= self.max_length:
            if not line:
                del self._lines[key]
            raise refuse("full", 0.0)
        ticket = Ticket(key, model)
        line.append(ticket)
        self._depth[model] = self._depth.get(model, 0) + 1
        if on_queued is not None:
            on_queued(Queued(len(line), len(line)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        told = len(line)
        try:
            with self._changes() as changed:
                ticket.turn.set()
                while True:
                    if ticket.turn.is_set():
                        ticket.turn.clear()
                        position = line.index(ticket) + 1
                        if position != told and on_queued is not None:  # moved up: those ahead left
                            told = position
                            on_queued(Queued(position, len(line)))
                        if position == 1:
                            changed.clear()  # a change while take() runs sets it again: looked at next round
                            slot = await take()
                            if slot is not None:
                                return Admitted(slot, time.monotonic() - ticket.joined, True)
                    left = deadline - loop.time()
                    if left <= 0:
                        raise refuse("wait", time.monotonic() - ticket.joined)
                    await _first(ticket.turn, changed if line[0] is ticket else None, left)
                    if changed.is_set() and line[0] is ticket:
                        ticket.turn.set()
        finally:
            self._leave(ticket, line)

    def _leave(self, ticket: Ticket, line: deque[Ticket]) -> None:
        index = line.index(ticket)
        del line[index]
        self._depth[ticket.model] = max(0, self._depth.get(ticket.model, 0) - 1)
        if not line and self._lines.get(ticket.key) is line:
            del self._lines[ticket.key]
        # Those behind moved up: a new head looks at once (more than one slot may
        # be free), the others tell their client their new place.
        for behind in list(line)[index:]:
            behind.turn.set()


async def _first(turn: asyncio.Event, changed: asyncio.Event | None, timeout: float) -> None:
    """Until ``turn`` or ``changed`` is set, or ``timeout`` seconds."""
    waits = {asyncio.ensure_future(turn.wait())}
    if changed is not None:
        waits.add(asyncio.ensure_future(changed.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
