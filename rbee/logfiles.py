"""Log files that never fill the disk: a text file (0600, appended to) that
is rotated before it would pass ``max_bytes``, NAME → NAME.1 → … →
NAME.BACKUPS, the oldest deleted. The hive's and its workers' logs
(rbee_hive/logbook.py) and the queen's log use it."""

from __future__ import annotations

from pathlib import Path

from rbee.paths import open_private

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUPS = 2


def shift_backups(path: Path, backups: int) -> None:
    """NAME → NAME.1 → … → NAME.BACKUPS, the oldest overwritten; NAME is gone
    afterwards (with no backups kept, simply removed)."""
    for n in range(backups, 0, -1):
        older = path.with_name(f"{path.name}.{n - 1}") if n > 1 else path
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n}"))
    if backups == 0:
        path.unlink(missing_ok=True)


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
        shift_backups(self.path, self.backups)
        self._fh = open_private(self.path, "w")
        self._size = 0


class RedirectedLog:
    """The file this process's stdout and stderr were pointed at by whoever
    started it (the queen starts a hive with ``>> logs/hive.log 2>&1``),
    rotated like RotatingFile: renamed NAME → NAME.1 → …, and a fresh NAME put
    behind file descriptors 1 and 2. Only while those still write to that very
    file (same inode), so a process whose output went elsewhere is left alone."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups

    def _ours(self) -> bool:
        import os

        try:
            here, out = os.stat(self.path), os.fstat(1)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (out.st_dev, out.st_ino)

    def rotate_if_due(self) -> bool:
        """Rotate when the file has passed max_bytes; True when it did."""
        import os
        import sys

        if not self._ours() or os.fstat(1).st_size <= self.max_bytes:
            return False
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        shift_backups(self.path, self.backups)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        return True
