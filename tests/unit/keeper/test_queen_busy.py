"""`rbee-keeper infer` through a queen when slots are busy (docs/queen.md,
"Admission queue"), against a scripted in-process queen and worker: the
queen's ALL_SLOTS_BUSY (its queue full) is final, with no retry; a worker
taken by another client between the assignment and the request sends the
keeper back to the queen, which is asked again at once; the 1/2/4 s retry
loop is the direct mode's alone."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from rbee.errors import RbeeError
from rbee.rpc import handle_errors
from rbee.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from tests.unit.keeper.fake_worker import API_KEY, Script, start_fake
from tests.unit.keeper.test_cli import run_keeper

pytestmark = pytest.mark.asyncio(loop_scope="session")


class ScriptedQueen(tasks_pb2_grpc.TaskServiceServicer):
    """Hands out the fake worker, or refuses the first ``refusals`` tasks as the queen does when its queue is full."""

    def __init__(self, worker_address: str, refusals: int = 0) -> None:
        self.worker_address = worker_address
        self.refusals = refusals
        self.submitted = 0

    @handle_errors
    async def SubmitInference(self, request, context):
        self.submitted += 1
        if self.refusals:
            self.refusals -= 1
            raise RbeeError("ALL_SLOTS_BUSY", f"All 1 slots of {request.model_ref} on here are busy and 64 requests are "
                            "queued already (--queue-length 64)", {"slots_total": 1, "slots_busy": 1})  # fmt: skip
        yield tasks_pb2.TaskEvent(event=common_pb2.Event(narration=common_pb2.NarrationEvent(
            actor="queen-rbee", emoji="⏳", message="All 1 slots of the model on here are busy: queued, position 1 of 1")))  # fmt: skip
        worker = common_pb2.WorkerInfo(id="fake-worker", address=self.worker_address, model_ref=request.model_ref, backend=common_pb2.BACKEND_CPU,
                                       state=common_pb2.WORKER_STATE_IDLE, slots_total=1, slots_available=1)  # fmt: skip
        yield tasks_pb2.TaskEvent(assigned=tasks_pb2.WorkerAssignment(node="here", worker=worker, api_key=API_KEY, warm=True))


async def scripted(script: Script, refusals: int = 0):
    worker_server, worker, address = await start_fake(script)
    queen = ScriptedQueen(address, refusals)
    server = grpc.aio.server()
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(queen, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return queen, worker, f"127.0.0.1:{port}", (server, worker_server)


async def infer(tmp_path, queen_address: str) -> tuple[int, str, str]:
    return await run_keeper(tmp_path, "--node", "here", "--model", "hf:org/repo", "--prompt", "hi",
                            "--queen", queen_address, "--api-key", "queen-key")  # fmt: skip


async def test_the_queens_refusal_is_final(tmp_path) -> None:
    queen, worker, address, servers = await scripted(Script(), refusals=1)
    try:
        code, out, err = await infer(tmp_path, address)
    finally:
        for s in servers:
            await s.stop(None)
    assert code == 1 and out == ""
    assert "ALL_SLOTS_BUSY" in err and "--queue-length 64" in err and "retry" not in err.lower()
    assert queen.submitted == 1 and worker.requests == []


async def test_a_worker_taken_meanwhile_sends_the_keeper_back_to_the_queen(tmp_path) -> None:
    queen, worker, address, servers = await scripted(Script(busy_times=1))
    try:
        code, out, err = await infer(tmp_path, address)
    finally:
        for s in servers:
            await s.stop(None)
    assert code == 0, err
    assert out == "Hello, bees!\n"
    assert "queued, position 1 of 1" in err  # the queen's narration, shown
    assert "was taken by another client meanwhile: asking the queen again (1/2)" in err
    assert "retry 1 of 3" not in err  # not the direct mode's timed retries
    assert queen.submitted == 2 and len(worker.requests) == 2


async def test_a_worker_taken_every_time_gives_up_after_three_tasks(tmp_path) -> None:
    queen, worker, address, servers = await scripted(Script(busy_times=5))
    try:
        code, out, err = await infer(tmp_path, address)
    finally:
        for s in servers:
            await s.stop(None)
    assert code == 1 and out == ""
    assert "ALL_SLOTS_BUSY" in err and queen.submitted == 3 and len(worker.requests) == 3
