"""Log files that never fill the disk: a text file (0600, appended to) that
is rotated before it would pass ``max_bytes``, NAME → NAME.1 → … →
NAME.BACKUPS, the oldest deleted. The hive's and its workers' logs
(rbee_hive/logbook.py) and the queen's log use it."""

from __future__ import annotations

from pathlib import Path

from rbee.paths import open_private

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUPS = 2


class RotatingFile:
    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._fh = open_private(self.path)
        self._size = self.path.stat().st_size

    def write(self, text: str) -> int:
        size = len(text.encode("utf-8", "replace"))
        if self._size and self._size + size > self.max_bytes:
            self._rotate()
        self._fh.write(text)
        self._fh.flush()  # a log is read while it is written (followers, tails)
        self._size += size
        return len(text)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def _rotate(self) -> None:
        self._fh.close()
        for n in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n - 1}") if n > 1 else self.path
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n}"))
        self._fh = open_private(self.path, "w")
        self._size = 0
