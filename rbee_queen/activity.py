"""What the queen has been doing, for whoever watches it live (the web page,
docs/web.md): recent tasks and downloads with their narration lines as the
CLI prints them, how each ended (its error code and suggestions), and the
progress of downloads.

``Activity`` keeps the last ``keep`` entries in memory and hands each change
to every subscriber's queue; a subscriber that falls behind by more than its
queue holds loses the oldest changes, never blocks the queen. ``Tracked`` is
a relay that records each line of one operation and forwards it unchanged to
the relay the operation was given (so a task's client sees what it always saw).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rbee.errors import RbeeError
from rbee.narration import event, format_line, level_of, stage_of, unit_of
from rbee.v1 import common_pb2

T = TypeVar("T")
LINES_PER_ENTRY = 200
SUBSCRIBER_QUEUE = 1000


@dataclass
class Entry:
    id: int
    kind: str  # "task" or "download"
    title: str
    node: str
    model: str
    started_unix_ms: int
    state: str = "running"  # running, done, failed
    outcome: str = ""  # "warm start", "cold start", a model's path...
    lines: deque = field(default_factory=lambda: deque(maxlen=LINES_PER_ENTRY))
    error: dict | None = None
    progress: dict | None = None
    ended_unix_ms: int = 0

    def as_dict(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "title": self.title, "node": self.node, "model": self.model,
            "started_unix_ms": self.started_unix_ms, "ended_unix_ms": self.ended_unix_ms, "state": self.state,
            "outcome": self.outcome, "lines": list(self.lines), "error": self.error, "progress": self.progress,
        }  # fmt: skip


def error_dict(err: RbeeError) -> dict:
    return {"code": err.code, "message": err.message, "details": {k: str(v) for k, v in err.details.items()},
            "suggestions": list(err.suggestions)}  # fmt: skip


def _line(ev: common_pb2.NarrationEvent) -> dict:
    return {"text": format_line(ev), "level": level_of(ev), "unix_ms": ev.unix_ms}


class Activity:
    def __init__(self, keep: int = 50) -> None:
        self._entries: deque[Entry] = deque(maxlen=keep)
        self._ids = itertools.count(1)
        self._subscribers: set[asyncio.Queue] = set()

    # -- watching --------------------------------------------------------------------------

    def recent(self) -> list[dict]:
        return [e.as_dict() for e in self._entries]

    @contextlib.contextmanager
    def subscribe(self):
        """A queue of (kind, data) changes: "entry" (an entry as a whole, when it
        starts or ends), "line" ({id, line}), "progress" ({id, progress}),
        "models" ({node}: that node's model list changed)."""
        queue: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def publish(self, kind: str, data: dict) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait((kind, data))

    # -- recording -------------------------------------------------------------------------

    def begin(self, kind: str, title: str, node: str, model: str) -> Entry:
        entry = Entry(next(self._ids), kind, title, node, model, int(time.time() * 1000))
        self._entries.append(entry)
        self.publish("entry", entry.as_dict())
        return entry

    def line(self, entry: Entry, ev: common_pb2.NarrationEvent) -> None:
        line = _line(ev)
        entry.lines.append(line)
        self.publish("line", {"id": entry.id, "line": line})

    def progress(self, entry: Entry, p: common_pb2.ProgressEvent) -> None:
        entry.progress = {"stage": stage_of(p), "done": p.done, "total": p.total, "unit": unit_of(p), "rate": p.rate,
                          "message": p.message}  # fmt: skip
        self.publish("progress", {"id": entry.id, "progress": entry.progress})

    def end(self, entry: Entry, outcome: str = "", error: RbeeError | None = None) -> None:
        entry.state = "failed" if error is not None else "done"
        entry.outcome = outcome
        entry.error = error_dict(error) if error is not None else None
        entry.ended_unix_ms = int(time.time() * 1000)
        self.publish("entry", entry.as_dict())

    async def run(self, entry: Entry, work: Awaitable[T], outcome=lambda result: "") -> T:
        """Await ``work`` and end ``entry`` with its outcome or its error."""
        try:
            result = await work
        except RbeeError as err:
            self.end(entry, error=err)
            raise
        except asyncio.CancelledError:
            self.end(entry, error=RbeeError("CANCELLED", "Cancelled: the client went away"))
            raise
        except Exception:
            self.end(entry, error=RbeeError("INTERNAL", "Failed unexpectedly: see the queen's log"))
            raise
        self.end(entry, outcome(result))
        return result


class Tracked:
    """The relay an operation narrates through, recorded into an activity entry."""

    def __init__(self, relay: Any, activity: Activity, entry: Entry) -> None:
        self._relay = relay
        self._activity = activity
        self.entry = entry

    def narrate(self, emoji: str, message: str, level: str = "info", actor: str = "queen-rbee") -> None:
        self._activity.line(self.entry, event(actor, emoji, message, level))
        self._relay.narrate(emoji, message, level, actor)

    def relay(self, ev: common_pb2.Event) -> None:
        if ev.HasField("narration"):
            self._activity.line(self.entry, ev.narration)
        elif ev.HasField("progress"):
            self._activity.progress(self.entry, ev.progress)
        self._relay.relay(ev)

    def check(self, name: str, passed: bool, message: str, warning: bool = False, **details: object) -> None:
        emoji = "⚠️" if warning else ("✅" if passed else "❌")
        level = "warn" if warning or not passed else "info"
        self._activity.line(self.entry, event("queen-rbee", emoji, message, level))
        self._relay.check(name, passed, message, warning, **details)


async def follow(activity: Activity) -> AsyncIterator[tuple[str, dict]]:
    """Every change from now on (for a stream that sends them on)."""
    with activity.subscribe() as queue:
        while True:
            yield await queue.get()
