"""SleepWorker through a real hive and a real worker process (the stand-in:
the real worker program and servicer on a fake engine): a CPU worker cannot
sleep (vLLM has sleep mode on CUDA only), and the hive relays the worker's
own refusal with its code; an unknown worker is WORKER_NOT_FOUND. The path of
a CUDA worker that does sleep was never run on this machine (docs/hive.md)."""

from __future__ import annotations

import grpc
import pytest

from rbee.errors import RbeeError
from rbee.v1 import registry_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_cpu_worker_refuses_to_sleep_and_the_hive_relays_its_code(start_hive, standin_program, model):
    hive = await start_hive(worker_binary=standin_program, extra_env={"RBEE_HIVE_WORKER_SLEEP_MODE": "1"})
    spawned = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    worker_id = spawned.worker.id

    with pytest.raises(RbeeError) as caught:
        await hive.call(hive.workers.SleepWorker, registry_pb2.SleepWorkerRequest(worker_id=worker_id))
    assert caught.value.code == "SLEEP_MODE_UNSUPPORTED"
    assert "CUDA only" in caught.value.message and "cpu" in caught.value.message
    # The status code travels too, not only the error's name.
    try:
        await hive.workers.SleepWorker(registry_pb2.SleepWorkerRequest(worker_id=worker_id), metadata=hive.md, timeout=60)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        pytest.fail("SleepWorker on a CPU worker succeeded")
    # The worker was not touched: still listed, still serving.
    listed = {w.id: w for w in await hive.list()}
    assert worker_id in listed

    with pytest.raises(RbeeError) as missing:
        await hive.call(hive.workers.SleepWorker, registry_pb2.SleepWorkerRequest(worker_id="w-nope"))
    assert missing.value.code == "WORKER_NOT_FOUND"


async def test_sleep_worker_needs_the_hive_key(start_hive, standin_program):
    hive = await start_hive(worker_binary=standin_program)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hive.workers.SleepWorker(registry_pb2.SleepWorkerRequest(worker_id="w-any"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
