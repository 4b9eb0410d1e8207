"""The node's log files under $RBEE_HOME/logs/ and live followers of them.

Every line the hive writes (its own narration, its workers' output) goes
through here, so following a log is waiting on a queue, not polling a file.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from rbee.fanout import Subscription
from rbee.logfiles import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, RotatingFile
from rbee.paths import confined, private_dir

log = logging.getLogger(__name__)

HIVE_SOURCE = "rbee-hive"
# Lines one follower may have unread before it is dropped (SLOW_FOLLOWER).
FOLLOWER_LIMIT = 10_000
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


class LogBook:
    def __init__(self, logs_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        self.dir = Path(logs_dir)
        self.max_bytes = max_bytes
        self.backups = backups
        self._files: dict[str, RotatingFile] = {}
        self._followers: list[tuple[str | None, Subscription[tuple[str, str]]]] = []

    def path_for(self, source: str) -> Path:
        if not _SAFE.match(source):
            raise ValueError(f"bad log source name {source!r}")
        return confined(self.dir, f"{source}.log", what="Log file")

    def sources(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        names = sorted(p.stem for p in self.dir.glob("*.log"))
        # The hive's own log first, then workers in name order.
        return sorted(names, key=lambda n: (n != HIVE_SOURCE, n))

    def write(self, source: str, line: str) -> None:
        line = line.rstrip("\n")
        try:
            fh = self._open(source)
            fh.write(line + "\n")
            fh.flush()
        except OSError as exc:  # a full disk must not take the hive down
            log.warning("cannot write %s log: %s", source, exc)
        for wanted, queue in list(self._followers):
            if wanted is None or wanted == source:
                queue.offer((source, line))

    def _open(self, source: str) -> RotatingFile:
        fh = self._files.get(source)
        if fh is None:
            # Logs hold prompts' effects, paths and errors of the node: the hive user's only.
            private_dir(self.dir, tighten=False)
            fh = self._files[source] = RotatingFile(self.path_for(source), self.max_bytes, self.backups)
        return fh

    def close(self, source: str) -> None:
        fh = self._files.pop(source, None)
        if fh is not None:
            fh.close()

    def close_all(self) -> None:
        for source in list(self._files):
            self.close(source)

    def tail(self, source: str, lines: int) -> list[str]:
        path = self.path_for(source)
        if not path.is_file() or lines <= 0:
            return []
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=lines)]

    def follow(self, source: str | None) -> "Follower":
        """Subscribe to new lines of one source (None = all). Subscribe before
        reading a tail: both happen without awaiting in between, so no line
        is lost or repeated."""
        return Follower(self, source)

    def _add(self, source: str | None, queue: Subscription[tuple[str, str]]) -> None:
        self._followers.append((source, queue))

    def _remove(self, queue: Subscription[tuple[str, str]]) -> None:
        self._followers = [(s, q) for s, q in self._followers if q is not queue]


class Follower:
    def __init__(self, book: LogBook, source: str | None) -> None:
        self._book = book
        # Bounded: a follower that stops reading is dropped with SLOW_FOLLOWER.
        self.queue: Subscription[tuple[str, str]] = Subscription(FOLLOWER_LIMIT, "log follower")
        book._add(source, self.queue)

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc: object) -> None:
        self._book._remove(self.queue)

    async def next(self) -> tuple[str, str]:
        return await self.queue.get()

    def pending(self) -> Iterator[tuple[str, str]]:
        while not self.queue.empty():
            yield self.queue.get_nowait()


class LogBookHandler(logging.Handler):
    """Python logging into the hive's own log file (warnings and up by default)."""

    def __init__(self, book: LogBook, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._book = book

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._book.write(HIVE_SOURCE, self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
