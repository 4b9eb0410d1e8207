"""One attempt at one file: continue the partial file on disk with a range
request, hash while writing, and classify what went wrong.

Runs in a worker thread (blocking I/O). huggingface_hub's own downloader
deletes its temporary file on failure and retries out of sight; the hive
needs resumable partials across attempts and restarts, a stall timeout of
its own, narrated retries and hash checks, so it drives the client's
session itself.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import get_session
from huggingface_hub.utils import hf_raise_for_status

from rbee_hive.provisioner.hub import RemoteFile, TransientError

log = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_WRITE_BUFFER = 1 << 20
_HASH_BLOCK = 4 << 20


class DiskFull(Exception):
    def __init__(self, path: Path, written: int, cause: OSError) -> None:
        super().__init__(str(cause))
        self.path = path
        self.written = written
        self.cause = cause


class Cancelled(Exception):
    pass


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


class Verifier:
    """Hash of the bytes against the hub's ETag: sha256 for LFS files, the
    git blob sha1 for the others (the client itself checks sizes only)."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.kind = "sha256" if remote.sha256 else "git-sha1" if (remote.git_sha1 and remote.size is not None) else "size"
        self.reset()

    def reset(self) -> None:
        # Bytes of the file hashed so far: a retry within the same download
        # continues from here instead of reading the partial file again.
        self.hashed = 0
        if self.kind == "sha256":
            self._hash: Any = hashlib.sha256()
        elif self.kind == "git-sha1":
            self._hash = hashlib.sha1(f"blob {self.remote.size}\0".encode())
        else:
            self._hash = None

    def update(self, data: bytes | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self.hashed += len(data)

    def pipelined(self) -> "_HashPipe":
        """Hash on a second thread while this one reads the socket: hashlib
        drops the GIL, so hashing no longer slows the transfer."""
        return _HashPipe(self)

    def seed_from(self, path: Path, count: int) -> None:
        """Hash the first ``count`` bytes already on disk (a resumed file)."""
        self.reset()
        self.hashed = count
        if self._hash is None or count == 0:
            return
        with path.open("rb") as fh:
            left = count
            while left > 0:
                block = fh.read(min(_HASH_BLOCK, left))
                if not block:
                    break
                self._hash.update(block)
                left -= len(block)

    def check(self, size_on_disk: int) -> str | None:
        """None when the file is right, else what is wrong."""
        expected = self.remote.size
        if expected is not None and size_on_disk != expected:
            return f"size {size_on_disk} bytes, expected {expected}"
        if self._hash is None:
            return None
        actual = self._hash.hexdigest()
        wanted = self.remote.sha256 or self.remote.git_sha1
        if actual != wanted:
            return f"{self.kind} {actual[:16]}…, expected {wanted[:16]}…"
        return None


class _HashPipe:
    _STOP = b""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=256)
        self._thread = threading.Thread(target=self._run, name="hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._queue.get()) is not self._STOP:
            self._verifier.update(block)

    def update(self, data: bytes) -> None:
        if data:
            self._queue.put(data)

    def close(self) -> None:
        self._queue.put(self._STOP)
        self._thread.join()

    def __enter__(self) -> "_HashPipe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ProgressFn = Callable[[int], None]


def fetch_once(
    remote: RemoteFile,
    part: Path,
    headers: dict[str, str],
    stall_timeout_s: float,
    connect_timeout_s: float,
    cancel: threading.Event,
    on_bytes: ProgressFn,
    verifier: Verifier | None = None,
) -> Verifier:
    """Bring ``part`` to the remote file's full length; return its verifier.

    ``verifier`` carries the hash of an earlier attempt; it is rebuilt from
    the partial file only when the two disagree (e.g. after a restart).
    Raises TransientError (stall, connection, server, range), DiskFull,
    Cancelled, or the client's HTTP errors for the caller to map.
    """
    verifier = verifier or Verifier(remote)
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have > remote.size:
        part.unlink()
        have = 0
    if verifier.hashed != have:
        verifier.seed_from(part, have)
    if remote.size is not None and have == remote.size:
        return verifier
    request_headers = dict(headers)
    if have:
        request_headers["Range"] = f"bytes={have}-"
    timeout = httpx2.Timeout(connect=connect_timeout_s, read=stall_timeout_s, write=connect_timeout_s, pool=connect_timeout_s)
    written = have
    try:
        with get_session().stream("GET", remote.url, headers=request_headers, timeout=timeout, follow_redirects=True) as resp:
            if resp.status_code == 416:
                # The partial is longer than the file now is: start over.
                part.unlink(missing_ok=True)
                raise TransientError("range", f"server refused range from byte {have}")
            if resp.status_code >= 400:
                resp.read()  # the client's error mapping reads the body
            hf_raise_for_status(resp)
            if have and resp.status_code == 200:
                log.info("%s: server ignored the range request; starting over", remote.path)
                have = written = 0
                verifier.reset()
            elif have and resp.status_code == 206:
                start = _content_range_start(resp.headers.get("Content-Range"))
                if start != have:
                    part.unlink(missing_ok=True)
                    raise TransientError("range", f"server answered range from {start}, asked {have}")
            try:
                with part.open("r+b" if have else "wb", buffering=_WRITE_BUFFER) as fh, verifier.pipelined() as hasher:
                    fh.seek(have)
                    fh.truncate()
                    for chunk in resp.iter_bytes():
                        if cancel.is_set():
                            raise Cancelled()
                        fh.write(chunk)
                        hasher.update(chunk)
                        written += len(chunk)
                        on_bytes(len(chunk))
            except OSError as exc:
                if is_disk_full(exc):
                    raise DiskFull(part, written, exc) from exc
                raise
    except httpx2.TimeoutException as exc:
        if isinstance(exc, httpx2.ConnectTimeout):
            raise TransientError("connection", f"connect timeout: {exc}") from exc
        raise TransientError("stall", f"no data for {stall_timeout_s:g} s at byte {written}") from exc
    except (httpx2.TransportError, ConnectionError) as exc:
        raise TransientError("connection", f"connection lost at byte {written}: {exc or type(exc).__name__}") from exc
    return verifier


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-999/1000"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


class Meter:
    """Bytes done and the recent rate (bytes/s over a short window)."""

    def __init__(self, total: int, done: int = 0, window_s: float = 3.0) -> None:
        self.total = total
        self.done = done
        self._window = window_s
        self._samples: list[tuple[float, int]] = [(time.monotonic(), done)]
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def set_done(self, done: int) -> None:
        with self._lock:
            self.done = done

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            done = self.done
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
                self._samples.pop(0)
            t0, d0 = self._samples[0]
        span = now - t0
        return max(0.0, (done - d0) / span) if span > 0 else 0.0
