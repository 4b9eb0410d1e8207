"""The kernel's own log (``/dev/kmsg``, readable as root): its records, and
the OOM kills it names. Shared by the worker (its engine process) and the
hive (its workers): SIGKILL alone proves nothing, the kernel says why.

Records are "prio,seq,usec,flags;message"; a reader that noted the sequence
number of the newest record when a process started (``last_kernel_seq``)
reads only what came after (``after_seq``), so an old kill of a reused pid
is never taken for a new one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

KMSG = Path("/dev/kmsg")
# The kernel ring buffer is small; bound the work anyway.
MAX_KERNEL_RECORDS = 50_000


@dataclass(frozen=True)
class KernelRecord:
    """One /dev/kmsg record: "prio,seq,usec,flags;message"."""

    seq: int
    text: str


def parse_kmsg_record(raw: str) -> KernelRecord | None:
    head, sep, text = raw.partition(";")
    if not sep:
        return None
    fields = head.split(",")
    try:
        seq = int(fields[1])
    except (IndexError, ValueError):
        return None
    # Continuation lines (" KEY=value") follow the message; keep the message.
    return KernelRecord(seq, text.split("\n", 1)[0])


def read_kernel_log(path: Path = KMSG, after_seq: int = -1) -> list[KernelRecord] | None:
    """The kernel ring buffer's records with a sequence number above
    ``after_seq``, oldest first; None when it cannot be read. ``path`` may
    also be a plain file of records, one per line (tests)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        log.debug("cannot open %s: %s", path, exc)
        return None
    raw: list[str] = []
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            with os.fdopen(os.dup(fd), errors="replace") as f:
                raw = [line for line in f.read().splitlines() if line and not line.startswith(" ")]
        else:
            # The kmsg device hands out one record per read.
            for _ in range(MAX_KERNEL_RECORDS):
                try:
                    data = os.read(fd, 8192)
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:
                        break  # everything there is has been read
                    if exc.errno == errno.EPIPE:
                        continue  # records were overwritten while reading: go on
                    log.debug("reading %s: %s", path, exc)
                    if not raw:
                        return None
                    break
                if not data:
                    break
                raw.append(data.decode("utf-8", errors="replace"))
    except OSError as exc:
        log.debug("reading %s: %s", path, exc)
        return None
    finally:
        os.close(fd)
    records = (parse_kmsg_record(r) for r in raw)
    return [r for r in records if r is not None and r.seq > after_seq]


def last_kernel_seq(path: Path = KMSG) -> int | None:
    """The sequence number of the newest record (None when unreadable)."""
    records = read_kernel_log(path)
    if records is None:
        return None
    return records[-1].seq if records else -1


@dataclass(frozen=True)
class OomKill:
    """What the kernel said about killing one process for want of memory."""

    pid: int
    name: str = ""
    # Resident memory of the victim when it was killed (anon + file + shmem).
    rss_kb: int | None = None
    # The memory cgroup whose limit was hit ("/" = the whole machine).
    memcg: str | None = None
    # "Memory cgroup out of memory: Killed process ..." or "Out of memory: ...".
    line: str = ""


_KILLED = re.compile(
    r"Killed process (?P<pid>\d+) \((?P<name>[^)]*)\)"
    r"(?:.*?anon-rss:(?P<anon>\d+)kB, file-rss:(?P<file>\d+)kB, shmem-rss:(?P<shmem>\d+)kB)?"
)
_OOM_KILL = re.compile(r"oom-kill:(?P<fields>.*)")


def oom_kills(records: Iterable[KernelRecord], pids: Iterable[int]) -> dict[int, OomKill]:
    """The OOM kills the records name among ``pids``."""
    wanted = set(pids)
    found: dict[int, OomKill] = {}
    memcg: dict[int, str] = {}
    for record in records:
        text = record.text
        m = _OOM_KILL.search(text)
        if m is not None:
            fields = dict(part.split("=", 1) for part in m.group("fields").split(",") if "=" in part)
            try:
                pid = int(fields.get("pid", ""))
            except ValueError:
                continue
            if pid in wanted:
                memcg[pid] = fields.get("oom_memcg", "")
                found.setdefault(pid, OomKill(pid, fields.get("task", "")))
            continue
        m = _KILLED.search(text)
        if m is None or int(m.group("pid")) not in wanted:
            continue
        pid = int(m.group("pid"))
        rss = None
        if m.group("anon") is not None:
            rss = int(m.group("anon")) + int(m.group("file")) + int(m.group("shmem"))
        found[pid] = OomKill(pid, m.group("name"), rss, None, text.strip())
    return {pid: replace(kill, memcg=memcg.get(pid) or kill.memcg) for pid, kill in found.items()}

