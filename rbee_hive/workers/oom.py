"""Was a worker killed by the kernel's OOM killer?

The exit status only says SIGKILL; the kernel log says why (rbee/kernel_log.py,
shared with the worker's account of its engine process). Only records written
after the worker started count (``after_seq``, noted at its start), so an old
kill of a pid the kernel has since reused is never taken for this one.
Reading the kernel log needs privileges; without them the answer is "no" and
callers say SIGKILL only.
"""

from __future__ import annotations

from pathlib import Path

from rbee.kernel_log import KMSG, last_kernel_seq, oom_kills, read_kernel_log

__all__ = ["KMSG", "killed_by_oom", "kernel_log_mark"]


def kernel_log_mark(path: Path = KMSG) -> int:
    """Where the kernel log stands now (-1 when it is empty or unreadable)."""
    seq = last_kernel_seq(path)
    return -1 if seq is None else seq


def killed_by_oom(pid: int, after_seq: int = -1, path: Path = KMSG) -> bool:
    return pid in oom_kills(read_kernel_log(path, after_seq) or [], [pid])
