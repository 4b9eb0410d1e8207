"""Shared jobs and event queues (one class each, fake work)."""

from __future__ import annotations

import asyncio

import pytest

from rbee.narration import progress_event
from rbee.v1 import common_pb2
from rbee_hive.provisioner.events import EventQueue, Reporter
from rbee_hive.provisioner.jobs import JobTable


def progress(done: int) -> common_pb2.Event:
    return common_pb2.Event(progress=progress_event("download", done, 10))


async def test_progress_coalesces_but_narration_is_kept():
    queue = EventQueue()
    queue.put(progress(1))
    queue.put(progress(2))
    queue.put(common_pb2.Event(narration=common_pb2.NarrationEvent(message="hello")))
    queue.put(progress(3))
    queue.put(progress(4))
    queue.close()
    items = []
    while (item := await queue.get()) is not None:
        items.append(item)
    assert [i.progress.done if i.HasField("progress") else i.narration.message for i in items] == [2, "hello", 4]


async def test_two_followers_share_one_run():
    table = JobTable()
    runs = 0
    gate = asyncio.Event()

    async def work(report: Reporter):
        nonlocal runs
        runs += 1
        report.narrate("📥", "working")
        await gate.wait()
        report.progress("download", 10, 10)
        return "result"

    async def follow(label):
        seen = []
        async for item in table.follow("k", work, lambda: common_pb2.Event(narration=common_pb2.NarrationEvent(message="joined"))):
            seen.append(item)
        return seen

    first = asyncio.create_task(follow("a"))
    while "k" not in table._jobs:
        await asyncio.sleep(0)
    second = asyncio.create_task(follow("b"))
    while table._jobs["k"].subscribers < 2:
        await asyncio.sleep(0)
    gate.set()
    a, b = await asyncio.gather(first, second)
    assert runs == 1
    assert a[-1] == "result" and b[-1] == "result"
    assert any(getattr(i, "narration", None) and i.narration.message == "joined" for i in b[:-1])
    assert not any(getattr(i, "narration", None) and i.narration.message == "joined" for i in a[:-1])
    assert table.active() == []


async def test_errors_reach_every_follower():
    table = JobTable()

    async def work(report):
        raise ValueError("boom")

    async def follow():
        async for _ in table.follow("k", work):
            pass

    results = await asyncio.gather(follow(), follow(), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)


async def test_last_follower_leaving_cancels_and_a_new_run_waits_for_it():
    table = JobTable()
    events: list[str] = []
    started = asyncio.Event()

    async def slow(report):
        events.append("start")
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            await asyncio.sleep(0.05)  # cleanup takes a moment
            events.append("cleaned")
            raise

    async def quick(report):
        events.append("second run")
        return 2

    async def follow(fn):
        async for item in table.follow("k", fn):
            last = item
        return last

    task = asyncio.create_task(follow(slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await follow(quick) == 2
    assert events == ["start", "cancelled", "cleaned", "second run"]
