"""Followers that stop reading cost bounded memory: a hive's log follower
and worker watcher and a worker's loading-progress subscriber are dropped
with SLOW_FOLLOWER once their queue is full (they grew without end), while
followers that keep reading lose nothing; log files rotate at their size cap
(they grew without end) and keep a fixed number of old files."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.errors import CODES, RbeeError
from rbee.v1 import common_pb2
from rbee_hive.logbook import FOLLOWER_LIMIT, HIVE_SOURCE, LogBook
from rbee_hive.workers.feed import WATCHER_LIMIT, ChangeFeed
from rbee_worker.status import SUBSCRIBER_LIMIT, WorkerStatus

pytestmark = pytest.mark.asyncio(loop_scope="session")


def assert_slow(err: RbeeError, limit: int) -> None:
    assert err.code == "SLOW_FOLLOWER" and CODES[err.code].name == "RESOURCE_EXHAUSTED"
    assert str(limit) in err.message and err.details["limit"] == str(limit)


async def test_a_log_follower_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    book = LogBook(tmp_path / "logs")
    with book.follow(None) as stalled, book.follow(None) as reading:
        for i in range(FOLLOWER_LIMIT * 2):
            book.write(HIVE_SOURCE, f"line {i}")
            assert await reading.next() == (HIVE_SOURCE, f"line {i}")
        assert stalled.queue.qsize() <= 1  # emptied when dropped
        with pytest.raises(RbeeError) as caught:
            await stalled.next()
        assert_slow(caught.value, FOLLOWER_LIMIT)
        with pytest.raises(RbeeError):  # and it stays dropped
            await stalled.next()
        book.write(HIVE_SOURCE, "after")
        assert await reading.next() == (HIVE_SOURCE, "after")
    book.close_all()


async def test_a_worker_watcher_that_stops_reading_is_dropped() -> None:
    feed = ChangeFeed(lambda: [], heartbeat_s=60)
    stalled = feed.watch("", 0)  # another instance: it opens with a snapshot
    await anext(stalled)  # subscribed (the catch-up: a snapshot)
    for i in range(WATCHER_LIMIT + 1):
        feed.upsert(common_pb2.WorkerInfo(id=f"w{i}"))
    with pytest.raises(RbeeError) as caught:
        await anext(stalled)
    assert_slow(caught.value, WATCHER_LIMIT)
    await stalled.aclose()
    assert not feed._watchers


async def test_a_loading_progress_subscriber_that_stops_reading_is_dropped() -> None:
    status = WorkerStatus()
    stalled, reading = status.subscribe(), status.subscribe()
    for i in range(SUBSCRIBER_LIMIT + 5):
        status.narration(common_pb2.NarrationEvent(message=f"m{i}"))
        assert (await reading.get()).message == f"m{i}"
    with pytest.raises(RbeeError) as caught:
        await stalled.get()
    assert_slow(caught.value, SUBSCRIBER_LIMIT)


async def test_logs_rotate_at_their_size_cap(tmp_path: Path) -> None:
    book = LogBook(tmp_path / "logs", max_bytes=4096, backups=2)
    for i in range(2000):
        book.write("worker-1", f"line {i:05d} " + "x" * 40)
    book.close_all()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["worker-1.log", "worker-1.log.1", "worker-1.log.2"]
    for name in files:
        path = tmp_path / "logs" / name
        assert 0 < path.stat().st_size <= 4096 and path.stat().st_mode & 0o777 == 0o600
    newest = (tmp_path / "logs" / "worker-1.log").read_text().splitlines()
    assert newest[-1].startswith("line 01999 ")
    older = (tmp_path / "logs" / "worker-1.log.1").read_text().splitlines()
    assert int(older[-1].split()[1]) + 1 == int(newest[0].split()[1])  # nothing lost between files
    assert book.sources() == ["worker-1"] and book.tail("worker-1", 1) == [newest[-1]]
    # A hive that starts again appends to the current file, counting what it holds.
    book = LogBook(tmp_path / "logs", max_bytes=4096, backups=2)
    for i in range(200):
        book.write("worker-1", "y" * 50)
    book.close_all()
    assert all((tmp_path / "logs" / n).stat().st_size <= 4096 for n in files)


async def test_a_rotating_file_serves_as_a_stream(tmp_path: Path) -> None:
    """The queen's log: narration and Python logging write to one RotatingFile."""
    import logging

    from rbee.logfiles import RotatingFile

    stream = RotatingFile(tmp_path / "queen.log", max_bytes=1024, backups=1)
    logger = logging.getLogger("rotation-test")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        for i in range(100):
            logger.warning("record %03d %s", i, "z" * 30)
    finally:
        logger.removeHandler(handler)
        stream.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["queen.log", "queen.log.1"]
    assert (tmp_path / "queen.log").read_text().splitlines()[-1].startswith("record 099")
    assert all(p.stat().st_size <= 1024 for p in tmp_path.iterdir())
