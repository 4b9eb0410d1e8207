"""How a failed worker start is explained: the error's details (exit code,
signal, the last lines of its log, the cause it reported) and suggestions
naming where to read the rest (docs/hive.md)."""

from __future__ import annotations

from typing import Any

from rbee.errors import RbeeError

from rbee_hive.workers.process import ExitInfo
from rbee_hive.workers.registry import WorkerRecord

LOG_LINES_IN_ERRORS = 15


def failure_details(record: WorkerRecord, info: ExitInfo | None) -> dict[str, Any]:
    details: dict[str, Any] = {"worker_id": record.id, "log_path": str(record.log_path)}
    if info is not None:
        details.update(exit_code=info.returncode, runtime_s=f"{info.runtime_s:.1f}")
        if info.signal_name:
            details["signal"] = info.signal_name
    if record.process is not None:
        details["last_log_lines"] = "\n".join(record.process.tail(LOG_LINES_IN_ERRORS))
    if record.failure is not None:
        details["cause"] = f"{record.failure.code}: {record.failure.message}"
    return details


def failure_suggestions(record: WorkerRecord) -> list[str]:
    return [
        f"Read the worker's log on the node: {record.log_path}",
        f"Or stream it: rbee-keeper logs --node NODE (worker {record.id})",
    ]


def startup_error(record: WorkerRecord, info: ExitInfo, startup_window_s: float) -> RbeeError:
    """A worker that exited before it was ready: killed for memory, crashed
    within the startup window, or exited later while loading its model."""
    if info.oom_killed:
        return RbeeError(
            "WORKER_OOM_KILLED",
            f"Worker {record.id} was killed by the kernel's OOM killer while starting (out of memory)",
            failure_details(record, info),
            ["Free memory on the node (stop other workers) or use a smaller model", *failure_suggestions(record)],
        )
    when = "crashed during startup" if info.runtime_s <= startup_window_s else "exited before its model was loaded"
    return RbeeError(
        "WORKER_STARTUP_FAILED",
        f"Worker startup failed: {record.id} {when} ({info.describe()} after {info.runtime_s:.1f}s)",
        failure_details(record, info),
        failure_suggestions(record),
    )


def callback_timeout_error(record: WorkerRecord, timeout_s: float) -> RbeeError:
    """A worker still running that never called back within the timeout."""
    return RbeeError(
        "WORKER_STARTUP_FAILED",
        f"Worker startup failed: {record.id} did not call back within {timeout_s:g}s",
        failure_details(record, None),
        failure_suggestions(record),
    )
