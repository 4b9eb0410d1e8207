"""The admission queue against the keeper's old retry loop, side by side in one run.

A worker of one slot is busy; another request for its model arrives; the slot
frees a moment later. What that request waits beyond the moment the slot
frees ("added latency": slot freed → its first token) is measured two ways:

  queue  the queen queues it (docs/queen.md, "Admission queue") and hands it
         the slot when the worker's report says it is free;
  retry  a queen without a queue (--queue-length 0) refuses it with
         ALL_SLOTS_BUSY and the client asks again after 1, 2, 4 s: the keeper's
         loop through the queen before the queue (its direct mode keeps the
         same schedule, rbee_keeper/direct.py Timeouts.busy_delays_s).

Two queens, each with its own local node (a real hive running the stand-in
worker: the real worker program on a fake engine), are measured in alternating
rounds with the same release offsets (the slot frees 0.2 … 3.3 s after the
request's first try). A request is a task (SubmitInference) then a
Generate of one token on the assigned worker, as the keeper does.

Run: .venv/bin/python -m bench.admission [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from rbee.channel import metadata, open_channel
from rbee.errors import from_rpc_error
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from rbee_keeper.direct import Timeouts
from tests.fixtures.hive import write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.ports import free_port
from tests.fixtures.queen import QueenProc, kill_node_hives, start_queen
from tests.hubserver import HubServer

REPO = "rbee-test/tiny"
REF = f"hf:{REPO}"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 3_000_000, "tokenizer.json": b"{}"}
# When the slot frees, after the waiting request's first try (seconds).
OFFSETS_S = (0.2, 0.5, 0.9, 1.4, 2.0, 2.6, 3.3)
RETRY_DELAYS_S = Timeouts().busy_delays_s


class Side:
    def __init__(self, name: str, queen: QueenProc, home: Path) -> None:
        self.name = name
        self.queen = queen
        self.home = home
        key = (queen.home / "queen.key").read_text().strip()
        self.md = metadata(key)
        self.channel = open_channel(queen.address)
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self.channel)
        self.cluster = tasks_pb2_grpc.ClusterWorkerServiceStub(self.channel)
        self.worker_channel: grpc.aio.Channel | None = None

    async def submit(self, on_queued: asyncio.Event | None = None) -> tasks_pb2.WorkerAssignment:
        call = self.tasks.SubmitInference(tasks_pb2.SubmitInferenceRequest(node="here", model_ref=REF, backend=common_pb2.BACKEND_CPU), metadata=self.md)
        try:
            async for item in call:
                if item.HasField("assigned"):
                    return item.assigned
                if on_queued is not None and item.event.HasField("narration") and "queued, position" in item.event.narration.message:
                    on_queued.set()
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.queen.address) from None
        raise RuntimeError("the task ended without a worker")

    def worker(self, a: tasks_pb2.WorkerAssignment) -> inference_pb2_grpc.InferenceServiceStub:
        if self.worker_channel is None:
            self.worker_channel = open_channel(a.worker.address)
        return inference_pb2_grpc.InferenceServiceStub(self.worker_channel)

    async def first_token(self, a: tasks_pb2.WorkerAssignment) -> None:
        call = self.worker(a).Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=1), metadata=metadata(a.api_key))
        async for msg in call:
            if msg.HasField("delta"):
                break
        call.cancel()

    async def hold(self, a: tasks_pb2.WorkerAssignment):
        """A long request on the worker's one slot, until cancelled; back once
        the queen's registry shows the slot taken."""
        call = self.worker(a).Generate(inference_pb2.GenerateRequest(prompt="hold", max_tokens=1000), metadata=metadata(a.api_key))
        await call.read()
        while True:
            listed = await self.cluster.ListClusterWorkers(tasks_pb2.ListClusterWorkersRequest(node="here"), metadata=self.md)
            if listed.workers and all(w.worker.slots_available == 0 for w in listed.workers):
                return call
            await asyncio.sleep(0.02)

    async def idle_again(self) -> None:
        while True:
            listed = await self.cluster.ListClusterWorkers(tasks_pb2.ListClusterWorkersRequest(node="here"), metadata=self.md)
            if listed.workers and all(w.worker.slots_available == w.worker.slots_total for w in listed.workers):
                return
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.channel.close()
        if self.worker_channel is not None:
            await self.worker_channel.close()
        await self.queen.close()
        kill_node_hives(self.home)


async def start_side(name: str, base: Path, hub: HubServer, program: Path, length: int) -> Side:
    env = hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s", STANDIN_LOAD_S="0.3",
                   RBEE_HIVE_WORKER_ENV="STANDIN_*,FAKE_ENGINE_*", FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.05",
                   RBEE_QUEEN_QUEUE_LENGTH=str(length), RBEE_QUEEN_HTTP_PORT="0")  # fmt: skip
    queen = await start_queen(base / name, **env)
    home = base / name / "node"
    code, _, err = await queen.keeper("setup", "add-node", "--name", "here", "--local", "--rbee-home", str(home),
                                      "--hive-port", str(free_port()))  # fmt: skip
    if code != 0:
        raise RuntimeError(err)
    code, _, err = await queen.keeper("infer", "--node", "here", "--model", REF, "--prompt", "hi", "--max-tokens", "1", "--slots", "1")
    if code != 0:
        raise RuntimeError(err)
    return Side(name, queen, home)


async def queued_round(side: Side, offset: float) -> float:
    """Slot freed → first token, for a request the queen queues."""
    holder = await side.hold(await side.submit())
    queued = asyncio.Event()
    waiter = asyncio.ensure_future(side.submit(queued))
    tried = time.perf_counter()
    await queued.wait()
    await asyncio.sleep(max(0.0, offset - (time.perf_counter() - tried)))
    holder.cancel()
    freed = time.perf_counter()
    await side.first_token(await waiter)
    return time.perf_counter() - freed


async def retry_round(side: Side, offset: float) -> float:
    """Slot freed → first token, for a client that retries ALL_SLOTS_BUSY after 1, 2, 4 s."""
    holder = await side.hold(await side.submit())
    freed = 0.0

    async def release() -> None:
        nonlocal freed
        await asyncio.sleep(offset)
        holder.cancel()
        freed = time.perf_counter()

    releaser = asyncio.ensure_future(release())
    delays = list(RETRY_DELAYS_S)
    while True:
        try:
            assignment = await side.submit()
            break
        except Exception as err:  # noqa: BLE001 - ALL_SLOTS_BUSY is the one expected
            if getattr(err, "code", "") != "ALL_SLOTS_BUSY" or not delays:
                raise
            await asyncio.sleep(delays.pop(0))
    await side.first_token(assignment)
    await releaser
    return time.perf_counter() - freed


async def run(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp, HubServer(Path(tmp) / "hub") as hub:
        base = Path(tmp)
        hub.add_repo(REPO, FILES)
        program = write_standin_program(base / "standin")
        queue, retry = await asyncio.gather(start_side("queue", base, hub, program, 64), start_side("retry", base, hub, program, 0))
        results: dict[str, list[float]] = {"queue": [], "retry": []}
        try:
            for _ in range(rounds):
                for offset in OFFSETS_S:
                    results["queue"].append(await queued_round(queue, offset))
                    await queue.idle_again()
                    results["retry"].append(await retry_round(retry, offset))
                    await retry.idle_again()
        finally:
            await asyncio.gather(queue.close(), retry.close())
    q, r = results["queue"], results["retry"]
    print(f"slot freed → first token of the waiting request, {len(q)} rounds each, release offsets {OFFSETS_S} s")
    for name, values in (("queue (admission queue)", q), ("retry (1, 2, 4 s loop)", r)):
        print(f"  {name:26} median {statistics.median(values) * 1000:8.1f} ms   max {max(values) * 1000:8.1f} ms")
    print(f"  retry / queue (medians)    {statistics.median(r) / statistics.median(q):8.1f}×")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.admission")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds))


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
