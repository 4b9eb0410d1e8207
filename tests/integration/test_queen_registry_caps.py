"""A hostile hive cannot flood the queen's worker registry: a real queen
follows a node whose "hive" reports 2,000 workers and a 64 KB entry; the
registry holds at most MAX_WORKERS_PER_HIVE of them and no oversized entry
(before, it held all it was told)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.v1 import common_pb2, registry_pb2, registry_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from rbee_queen.workers import MAX_WORKER_INFO_BYTES, MAX_WORKERS_PER_HIVE

from tests.fixtures.hive import free_port_block
from tests.fixtures.queen import QueenProc

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOOD = 2000


def worker(i: int, model_ref: str = "hf:o/r") -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(id=f"w{i:05d}", model_ref=model_ref, backend=common_pb2.BACKEND_CPU, address=f"127.0.0.1:{20000 + i % 1000}",
                                 state=common_pb2.WORKER_STATE_IDLE)  # fmt: skip


class FloodingHive(registry_pb2_grpc.HiveWorkerServiceServicer):
    async def WatchWorkers(self, request, context):
        yield registry_pb2.WatchWorkersResponse(hive_instance="flood", seq=1, snapshot=True,
                                                workers=[worker(i) for i in range(FLOOD // 2)])  # fmt: skip
        yield registry_pb2.WatchWorkersResponse(hive_instance="flood", seq=2, workers=[worker(99999, "hf:o/" + "x" * 65536)])
        for seq, start in enumerate(range(FLOOD // 2, FLOOD, 100), start=3):
            yield registry_pb2.WatchWorkersResponse(hive_instance="flood", seq=seq, workers=[worker(i) for i in range(start, start + 100)])
        await asyncio.Event().wait()  # then stays connected


async def cluster_workers(queen: QueenProc) -> list[tasks_pb2.ClusterWorker]:
    key = (queen.home / "queen.key").read_text().strip()
    channel = open_channel(queen.address)
    try:
        reply = await tasks_pb2_grpc.ClusterWorkerServiceStub(channel).ListClusterWorkers(
            tasks_pb2.ListClusterWorkersRequest(node="flood"), metadata=auth_metadata(key), timeout=30)
    finally:
        await channel.close()
    return list(reply.workers)


async def test_a_hive_cannot_flood_the_queens_registry(queen: QueenProc, tmp_path: Path) -> None:
    port = free_port_block(1)
    server = grpc.aio.server()
    registry_pb2_grpc.add_HiveWorkerServiceServicer_to_server(FloodingHive(), server)
    checker = health.aio.HealthServicer()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        code, out, err = await queen.keeper("setup", "add-node", "--name", "flood", "--local", "--install-path",
                                            str(tmp_path / "rbee"), "--hive-port", str(port))  # fmt: skip
        assert code == 0, err
        listed: list = []
        for _ in range(600):  # until the queen has taken in the whole stream (its last worker id)
            listed = await cluster_workers(queen)
            if len(listed) >= MAX_WORKERS_PER_HIVE or any(w.worker.id == f"w{FLOOD - 1:05d}" for w in listed):
                break
            await asyncio.sleep(0.1)
        assert len(listed) == MAX_WORKERS_PER_HIVE, len(listed)
        assert all(w.worker.ByteSize() <= MAX_WORKER_INFO_BYTES for w in listed)
        assert "beyond the queen's caps" in queen.text()
    finally:
        await server.stop(None)
