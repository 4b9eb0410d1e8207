"""The front door's router with the admission queue (rbee_queen/http/routing.py):
a slot picked for a request counts as taken before the request begins, a
request the router saw end frees its slot before the worker's next report,
and a report of a freed slot admits the head of the line."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import common_pb2, registry_pb2
from rbee_queen.admission import AdmissionQueue
from rbee_queen.http.routing import Router, _Cached
from rbee_queen.http.upstream import WorkerLease
from rbee_queen.nodes.store import NodeStore
from rbee_queen.workers import ClusterWorkers

MODEL = "hf:org/model"


def report(registry: ClusterWorkers, seq: int, available: int, activity: int = 0) -> None:
    """What the hive's change stream brings: the worker with its free slots."""
    info = common_pb2.WorkerInfo(id="w-1", address="127.0.0.1:1", model_ref=MODEL, backend=common_pb2.BACKEND_CPU,
                                 state=common_pb2.WORKER_STATE_IDLE if available else common_pb2.WORKER_STATE_BUSY,
                                 slots_total=1, slots_available=available, last_activity_unix_ms=activity)  # fmt: skip
    registry.apply("here", "127.0.0.1:2", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", seq=seq, workers=[info]))


@pytest.fixture
def router(tmp_path: Path):
    registry = ClusterWorkers(120)
    report(registry, 1, 1)
    store = NodeStore(tmp_path / "beehives.db")
    queue = AdmissionQueue(4, 60, registry.listen)
    r = Router(store, registry, None, Narrator("queen-rbee", stream=open(os.devnull, "w")), 1, queue=queue)
    r._access["w-1"] = _Cached(WorkerLease("here", "w-1", "127.0.0.1:1", "key", False, MODEL))
    yield r
    store.close()


async def until_waiting(r: Router, n: int) -> None:
    async def settled() -> None:
        while r.queue.depths().get(MODEL, 0) != n:
            await asyncio.sleep(0)

    await asyncio.wait_for(settled(), 10)  # a bound, not a measure: a wrong router never gets there


async def test_a_picked_slot_is_taken_so_the_next_request_queues(router: Router) -> None:
    first = await router.pick(MODEL, None)
    assert first is not None
    second = asyncio.ensure_future(router.pick(MODEL, None))
    await until_waiting(router, 1)  # the registry still says free: the pick counts
    # The first request runs and ends; the worker has not reported yet.
    async with router.using(first):
        await asyncio.sleep(0)
        assert not second.done()
    assert (await second).worker_id == "w-1"
    assert router.queue.depths() == {MODEL: 0}


async def test_a_report_of_a_freed_slot_admits_the_head(router: Router) -> None:
    report(router.registry, 2, 0, activity=1)  # someone else (a task API client) holds the slot
    waiting = asyncio.ensure_future(router.pick(MODEL, None))
    await until_waiting(router, 1)
    report(router.registry, 3, 1, activity=2)  # that client's request ended
    assert (await waiting).worker_id == "w-1"


async def test_a_full_line_is_all_slots_busy_and_a_cancelled_request_leaves(router: Router) -> None:
    report(router.registry, 2, 0, activity=1)
    router.queue.max_length = 1
    waiting = asyncio.ensure_future(router.pick(MODEL, None))
    await until_waiting(router, 1)
    with pytest.raises(RbeeError) as err:
        await router.pick(MODEL, None)
    assert err.value.code == "ALL_SLOTS_BUSY" and "--queue-length 1" in err.value.message
    waiting.cancel()  # the HTTP client went away
    await asyncio.gather(waiting, return_exceptions=True)
    assert router.queue.depths() == {MODEL: 0}
