"""The front door's router spreads quick requests (rbee_queen/http/routing.py):
when every worker of the model is equally free at each pick, as with requests
that end before the next arrives, the ties go to the worker picked least, not
to the first one listed."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from rbee.narration import Narrator
from rbee.v1 import common_pb2, registry_pb2
from rbee_queen.admission import AdmissionQueue
from rbee_queen.http.routing import Router, _Cached
from rbee_queen.http.upstream import WorkerLease
from rbee_queen.nodes.store import NodeStore
from rbee_queen.workers import ClusterWorkers

MODEL = "hf:org/model"
IDS = ["w-1", "w-2", "w-3", "w-4"]


@pytest.fixture
def router(tmp_path: Path):
    registry = ClusterWorkers(120)
    workers = [common_pb2.WorkerInfo(id=i, address=f"127.0.0.1:{n + 1}", model_ref=MODEL, backend=common_pb2.BACKEND_CPU, state=common_pb2.WORKER_STATE_IDLE,
                                     slots_total=8, slots_available=8) for n, i in enumerate(IDS)]  # fmt: skip
    registry.apply("here", "127.0.0.1:9", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", seq=1, workers=workers))
    store = NodeStore(tmp_path / "beehives.db")
    r = Router(store, registry, None, Narrator("queen-rbee", stream=open(os.devnull, "w")), 1, queue=AdmissionQueue(4, 60, registry.listen))
    for n, i in enumerate(IDS):
        r._access[i] = _Cached(WorkerLease("here", i, f"127.0.0.1:{n + 1}", "key", False, MODEL))
    yield r
    store.close()


async def test_quick_requests_go_round_the_equally_free_workers(router: Router) -> None:
    served: Counter[str] = Counter()
    for _ in range(16):
        lease = await router.pick(MODEL, None)
        assert lease is not None
        async with router.using(lease):  # the request runs and ends before the next one comes
            served[lease.worker_id] += 1
    assert served == {i: 4 for i in IDS}


async def test_a_freer_worker_still_comes_first(router: Router) -> None:
    held = [await router.pick(MODEL, None) for _ in range(3)]  # three slots taken, one on each of three workers
    assert len({h.worker_id for h in held if h}) == 3
    free = await router.pick(MODEL, None)
    assert free is not None and free.worker_id not in {h.worker_id for h in held if h}


async def test_a_replica_added_later_takes_its_turn_not_every_tie(router: Router) -> None:
    # w-4 joins after the other three served 30 quick requests: from then on
    # the requests go round all four, not all to w-4 until it caught up.
    def listed(ids: list[str], seq: int) -> None:
        workers = [common_pb2.WorkerInfo(id=i, address=f"127.0.0.1:{IDS.index(i) + 1}", model_ref=MODEL, backend=common_pb2.BACKEND_CPU,
                                         state=common_pb2.WORKER_STATE_IDLE, slots_total=8, slots_available=8) for i in ids]  # fmt: skip
        router.registry.apply("here", "127.0.0.1:9", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", seq=seq, workers=workers))

    async def quick(n: int) -> Counter[str]:
        served: Counter[str] = Counter()
        for _ in range(n):
            lease = await router.pick(MODEL, None)
            assert lease is not None
            async with router.using(lease):
                served[lease.worker_id] += 1
        return served

    listed(IDS[:3], 2)
    assert await quick(30) == {i: 10 for i in IDS[:3]}
    listed(IDS, 3)
    assert await quick(16) == {i: 4 for i in IDS}
