"""Supervision (S8): health checks every interval (N failures in a row →
removed and stopped) and the idle timeout (idle workers are shut down; the
hive keeps running; a worker the queen started with its keep-alive is the
queen's to stop, docs/queen.md "Idle memory"). Liveness and idleness use the
monotonic clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from rbee_hive.settings import HiveSettings
from rbee_hive.workers.client import HealthResult
from rbee_hive.workers.manager import WorkerManager
from rbee_hive.workers.registry import State, WorkerRecord

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, settings: HiveSettings, manager: WorkerManager, narrate: Callable[..., Any]) -> None:
        self.settings = settings
        self.manager = manager
        self.registry = manager.registry
        self._narrate = narrate
        self._tasks: list[asyncio.Task[None]] = []
        self.rounds = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._health_loop(), name="hive-health"),
            loop.create_task(self._idle_loop(), name="hive-idle"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks = []

    # -- health ---------------------------------------------------------------
    async def _health_loop(self) -> None:
        interval = self.settings.health_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for a condition
            try:
                await self.check_round()
            except Exception:  # noqa: BLE001 - supervision must keep going
                log.exception("health round failed")

    async def probe(self, record: WorkerRecord) -> HealthResult:
        return await self.manager.client(record).health(self.settings.health_timeout.total_seconds())

    async def check_round(self) -> None:
        records = [r for r in self.registry.all() if not r.stopping]
        await asyncio.gather(*(self._check(r) for r in records))
        self.rounds += 1

    async def _check(self, record: WorkerRecord) -> None:
        if record.process is not None:
            record.process.alive_tree()  # remember the engine's processes while the leader lives
        result = await self.probe(record)
        if record.stopping:
            return
        if result.reachable:
            if record.health_failures:
                self._narrate("💚", f"{record.id} answers health checks again")
            record.health_failures = 0
            return
        record.health_failures += 1
        limit = self.settings.health_failures
        self._narrate(
            "⚠️",
            f"Health check of {record.id} at {record.address} failed ({record.health_failures}/{limit}): {result.status}",
            "warn",
        )
        if record.health_failures >= limit:
            await self.manager.remove_unhealthy(record, record.health_failures)

    # -- idle -----------------------------------------------------------------
    async def _idle_loop(self) -> None:
        timeout = self.settings.idle_timeout.total_seconds()
        while True:
            self.registry.changed.clear()
            now = time.monotonic()
            next_due: float | None = None
            for record in self.registry.all():
                if record.stopping or record.state != State.WORKER_STATE_IDLE or record.queen_keep_alive:
                    continue
                due = record.last_activity + timeout
                if due <= now:
                    idle_for = now - record.last_activity
                    self._narrate("💤", f"{record.id} has been idle for {idle_for:.0f}s (timeout {timeout:g}s); shutting it down")
                    record.stopping = True
                    asyncio.get_running_loop().create_task(self._stop_idle(record))
                else:
                    next_due = due if next_due is None else min(next_due, due)
            wait = None if next_due is None else max(0.0, next_due - now)
            try:
                # Wake at the next deadline, or earlier when the registry changes.
                await asyncio.wait_for(self.registry.changed.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    async def _stop_idle(self, record: WorkerRecord) -> None:
        try:
            await self.manager.stop(record.id, reason="idle timeout")
        except Exception:  # noqa: BLE001
            log.exception("stopping idle worker %s failed", record.id)
