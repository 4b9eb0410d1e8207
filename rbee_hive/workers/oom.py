"""Was a process killed by the kernel's OOM killer?

The exit status only says SIGKILL; the kernel log says why. It names the
victim as ``Killed process 1234 (python)`` (and ``oom-kill:...,pid=1234,...``
on newer kernels). Reading the kernel log needs privileges; without them the
answer is "unknown" and callers say SIGKILL only.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

KMSG = Path("/dev/kmsg")
# Bound the work: the kernel ring buffer is small, but be safe.
_MAX_RECORDS = 20000


def mentions_oom_kill(lines: Iterable[str], pid: int) -> bool:
    killed = re.compile(rf"Killed process {pid}\b")
    oom_kill = re.compile(rf"oom-kill:.*\bpid={pid}\b")
    return any(killed.search(line) or oom_kill.search(line) for line in lines)


def read_kernel_log(path: Path = KMSG) -> list[str]:
    """Every record in the kernel ring buffer, oldest first ([] if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        log.debug("cannot open %s: %s", path, exc)
        return []
    records: list[str] = []
    try:
        while len(records) < _MAX_RECORDS:
            try:
                data = os.read(fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break  # read everything there is
                if exc.errno == errno.EPIPE:
                    continue  # records were overwritten while reading: skip on
                log.debug("reading %s: %s", path, exc)
                break
            if not data:
                break
            # "prio,seq,usec,flags;message"
            text = data.decode("utf-8", errors="replace")
            records.append(text.split(";", 1)[-1].rstrip("\n"))
    finally:
        os.close(fd)
    return records


def killed_by_oom(pid: int, path: Path = KMSG) -> bool:
    return mentions_oom_kill(read_kernel_log(path), pid)
