"""Exec a worker program so that it dies with the hive.

Runs as ``python -m rbee_hive.workers.launch PROGRAM ARGS...``: asks Linux to
send SIGTERM to this process when its parent (the hive) dies, keeps to the
cores the hive gave it (``RBEE_WORKER_CPUS``, rbee_hive/workers/cores.py),
restricts itself to the hive's Landlock policy when given one (``RBEE_WORKER_SANDBOX``,
rbee_hive/workers/sandbox.py), then execs the program in place (same pid). Done here rather than between fork and exec in
the hive, where a multi-threaded gRPC process must not run Python code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m rbee_hive.workers.launch PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(2)
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the hive still stops its workers itself; this only covers its own sudden death
        if os.getppid() == 1:  # the hive died before we got here
            sys.exit(1)
    cpus = os.environ.pop("RBEE_WORKER_CPUS", None)
    if cpus:  # the cores the hive gave this worker (rbee_hive/workers/cores.py)
        from rbee.cpus import parse_cpu_list

        try:
            os.sched_setaffinity(0, parse_cpu_list(cpus))
        except (ValueError, OSError, AttributeError) as exc:
            print(f"[rbee-hive] ⚠️ cannot restrict the worker to cores {cpus}: {exc}", flush=True)
    policy = os.environ.pop("RBEE_WORKER_SANDBOX", None)
    if policy:
        from rbee_hive.workers.sandbox import restrict

        try:
            restrict(policy)
        except (OSError, ValueError, KeyError) as exc:
            # Never run a worker with less protection than the hive announced.
            print(f"[rbee-hive] ❌ cannot sandbox the worker (Landlock): {exc}", flush=True)
            sys.exit(126)
    program = sys.argv[1]
    try:
        os.execv(program, [program, *sys.argv[2:]])
    except OSError as exc:
        print(f"[rbee-hive] ❌ cannot run {program}: {exc}", flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
