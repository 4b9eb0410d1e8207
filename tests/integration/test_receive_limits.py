"""Memory before authentication (docs/security.md): a client without a key
can make a daemon take in nothing of what it sends. Each daemon, a real
process, gets 16 concurrent unauthenticated calls of 60 MB (960 MB in all);
its peak resident memory (the kernel's high-water mark) grows by less than
a fifth of it (reading them took 1.4 GB), and every call is refused: for the missing key, or by
grpc's receive limit before the message is read."""

from __future__ import annotations

import asyncio

import pytest

from bench.limits import MB, flood_memory
from tests.unit.worker.test_program import fake_worker

pytestmark = pytest.mark.asyncio(loop_scope="session")

CALLS, SIZE = 16, 60 * MB
# What HTTP/2 buffers in flow-control windows and the first calls' own
# allocations; the code that read every request before the key check grew
# by 1.4 GB here (bench/limits.py).
GROWTH_LIMIT = 200 * MB


def assert_refused_without_reading(name: str, m: dict) -> None:
    answers = m["outcomes"]
    assert sum(answers.values()) == CALLS
    for what in answers:
        assert what.startswith(("UNAUTHENTICATED: Missing API key", "RESOURCE_EXHAUSTED")), (name, answers)
    growth = m["peak"] - m["before"]
    assert growth < GROWTH_LIMIT, f"{name}: peak RSS {m['peak'] / MB:.0f} MB from {m['before'] / MB:.0f} MB ({answers})"


async def test_a_hive_reads_no_unauthenticated_request(start_hive):
    hive = await start_hive()
    m = await asyncio.to_thread(flood_memory, hive.proc.pid, f"127.0.0.1:{hive.port}",
                                "/rbee.v1.HiveWorkerService/SpawnWorker", CALLS, SIZE)  # fmt: skip
    assert_refused_without_reading("rbee-hive", m)


async def test_a_queen_reads_no_unauthenticated_request(queen):
    m = await asyncio.to_thread(flood_memory, queen.proc.pid, queen.address, "/rbee.v1.NodeService/AddNode", CALLS, SIZE)
    assert_refused_without_reading("queen-rbee", m)


@pytest.mark.parametrize("method", ["/rbee.v1.InferenceService/Generate", "/rbee.v1.InferenceService/Cancel"])
async def test_a_worker_reads_no_unauthenticated_request(tmp_path, method):
    async with fake_worker(tmp_path) as worker:
        await worker.wait_loaded()
        m = await asyncio.to_thread(flood_memory, worker.proc.pid, worker.address, method, CALLS, SIZE)
    assert_refused_without_reading("llm-worker-rbee", m)
