"""Shared operations: several requests for the same model follow one download.

A job runs once per key; each request subscribes and receives the job's
events from then on (plus the latest progress) and its result. When the last
subscriber leaves before the end, the job is cancelled; its partial files
stay for the next attempt. A new job for a key waits until the previous
(cancelled) one has fully stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from rbee.narration import Narrator
from rbee.v1 import common_pb2
from rbee_hive.provisioner.events import EventQueue, Reporter

log = logging.getLogger(__name__)

JobFn = Callable[[Reporter], Awaitable[Any]]


class _Result:
    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error


class Job:
    def __init__(self, key: str, fn: JobFn, narrator: Narrator | None, previous: "Job | None") -> None:
        self.key = key
        self.report = Reporter(narrator)
        self._subscribers: list[EventQueue] = []
        self.report.add_listener(self._fan_out)
        self.finished = asyncio.Event()
        self.result: _Result | None = None
        self.cancelling = False
        self._task = asyncio.create_task(self._run(fn, previous), name=f"job:{key}")

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _fan_out(self, ev: common_pb2.Event) -> None:
        for queue in self._subscribers:
            queue.put(ev)

    async def _run(self, fn: JobFn, previous: "Job | None") -> None:
        try:
            if previous is not None:
                await previous.finished.wait()
            value = await fn(self.report)
            self.result = _Result(value=value)
        except asyncio.CancelledError:
            self.result = _Result(error=asyncio.CancelledError())
        except BaseException as exc:  # handed to every subscriber
            self.result = _Result(error=exc)
        finally:
            self.finished.set()
            for queue in self._subscribers:
                queue.close()

    def subscribe(self) -> EventQueue:
        queue = EventQueue()
        if self.report.last_progress is not None:
            queue.put(common_pb2.Event(progress=self.report.last_progress))
        self._subscribers.append(queue)
        if self.finished.is_set():
            queue.close()
        return queue

    def unsubscribe(self, queue: EventQueue) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)
        if not self._subscribers and not self.finished.is_set():
            self.cancelling = True
            self._task.cancel()


class JobTable:
    def __init__(self, narrator: Narrator | None = None) -> None:
        self._jobs: dict[str, Job] = {}
        self._narrator = narrator

    def active(self) -> list[str]:
        return [k for k, j in self._jobs.items() if not j.finished.is_set()]

    def get_or_start(self, key: str, fn: JobFn) -> tuple[Job, bool]:
        """The running job for ``key`` (joined=True) or a new one."""
        job = self._jobs.get(key)
        if job is not None and not job.finished.is_set() and not job.cancelling:
            return job, True
        previous = job if job is not None and not job.finished.is_set() else None
        job = Job(key, fn, self._narrator, previous)
        self._jobs[key] = job
        asyncio.get_running_loop().create_task(self._forget_when_done(job))
        return job, False

    async def _forget_when_done(self, job: Job) -> None:
        await job.finished.wait()
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]

    async def follow(
        self, key: str, fn: JobFn, on_join: Callable[[], common_pb2.Event] | None = None
    ) -> AsyncIterator[Any]:
        """Events of the job for ``key`` as they happen, then its result
        (yielded last), or its error (raised). ``on_join`` makes the event a
        request sees first when it joins a job already running."""
        job, joined = self.get_or_start(key, fn)
        queue = job.subscribe()
        try:
            if joined and on_join is not None:
                yield on_join()
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
            result = job.result
            if result is None or (result.error is not None and isinstance(result.error, asyncio.CancelledError)):
                raise asyncio.CancelledError()
            if result.error is not None:
                raise result.error
            yield result.value
        finally:
            job.unsubscribe(queue)
