import asyncio

import pytest

from rbee.errors import RbeeError
from rbee.narration import event, progress_event
from rbee.v1 import common_pb2
from rbee_hive.workers.events import EventLog

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def collect(log: EventLog) -> list:
    return [item async for item in log.follow()]


async def test_late_followers_get_everything_and_the_end():
    log = EventLog()
    log.narration(event("rbee-hive", "🚀", "starting"))
    early = asyncio.ensure_future(collect(log))
    await asyncio.sleep(0)
    log.progress(progress_event("weights", 1, 2))
    log.worker(common_pb2.WorkerInfo(id="w", state=common_pb2.WORKER_STATE_IDLE))
    log.finish()
    log.narration(event("rbee-hive", "x", "after the end is dropped"))
    late = await collect(log)
    assert [i.WhichOneof("kind") for i in late] == ["narration", "progress", "worker"]
    assert [i.WhichOneof("kind") for i in await asyncio.wait_for(early, 5)] == ["narration", "progress", "worker"]


async def test_a_failed_spawn_ends_followers_with_its_error():
    log = EventLog()
    log.narration(event("llm-worker-rbee", "💥", "boom"))
    log.finish(RbeeError("WORKER_STARTUP_FAILED", "Worker startup failed"))
    seen = []
    with pytest.raises(RbeeError) as exc:
        async for item in log.follow():
            seen.append(item)
    assert exc.value.code == "WORKER_STARTUP_FAILED" and len(seen) == 1
