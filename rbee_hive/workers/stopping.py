"""How one worker is stopped: its shutdown request, the wait for its exit within
the grace, then force-killing its process tree; and the removal of a worker
that stopped answering its health checks. The WorkerManager keeps the
bookkeeping (one stop at a time per worker, the shutdown cascade)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rbee.errors import RbeeError

from rbee_hive.settings import HiveSettings
from rbee_hive.workers.client import WorkerClient
from rbee_hive.workers.peak import PeakRecorder
from rbee_hive.workers.registry import Registry, WorkerRecord
from rbee_hive.workers.spec import StopResult


class WorkerStopper:
    def __init__(
        self,
        settings: HiveSettings,
        registry: Registry,
        pending: dict[str, WorkerRecord],
        peaks: PeakRecorder,
        client: Callable[[WorkerRecord], WorkerClient],
        say: Callable[..., Any],
    ) -> None:
        self.settings = settings
        self.registry = registry
        # The manager's spawns still waiting for their first callback (shared, not copied).
        self._pending = pending
        self.peaks = peaks
        self._client = client
        self._say = say

    async def stop(self, record: WorkerRecord, grace: float | None, reason: str) -> StopResult:
        grace = self.settings.shutdown_grace.total_seconds() if grace is None else grace
        record.stopping = True
        self.registry.changed.set()
        process = record.process
        if process is not None:
            process.mark_stop_requested()
        self._say(record, "👋", f"Shutting down {record.id} ({reason})")
        if process is None or not process.running:
            self.registry.remove(record.id)
            self._pending.pop(record.id, None)
            code = process.exit_info.returncode if process and process.exit_info else 0
            return StopResult(record.id, False, code)
        await self.peaks.sample_now(record)
        try:
            await self._client(record).shutdown(int(grace * 1000), timeout=min(5.0, max(grace, 1.0)))
        except RbeeError as err:
            self._say(record, "⚠️", f"{record.id} did not take the shutdown request ({err.code}); it will be signalled", "warn")
        self._say(record, "⏳", f"Waiting up to {grace:g}s for {record.id} (pid {process.pid}) to exit")
        info = await process.wait_for_exit(grace)
        forced = False
        if info is None:
            self._say(record, "🔪", f"{record.id} did not exit within {grace:g}s; force-killing its process tree", "warn")
            info, forced = await process.kill(self.settings.kill_wait.total_seconds())
        self.registry.remove(record.id)
        self._pending.pop(record.id, None)
        code = info.returncode if info else -9
        self._say(record, "🛑", f"{record.id} terminated ({info.describe() if info else 'killed'})")
        return StopResult(record.id, forced, code)

    async def remove_unhealthy(self, record: WorkerRecord, failures: int) -> None:
        record.stopping = True
        self.registry.remove(record.id)
        self._say(
            record,
            "💀",
            f"{record.id} failed {failures} health checks in a row; removed from the registry, stopping its processes",
            "warn",
        )
        if record.process is not None:
            wait = self.settings.kill_wait.total_seconds()
            info, forced = await record.process.terminate(wait, wait)
            how = "force-killed" if forced else (info.describe() if info else "gone")
            self._say(record, "🛑", f"{record.id} terminated ({how})")
