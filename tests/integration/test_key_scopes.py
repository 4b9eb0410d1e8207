"""Key scopes with real processes (S13): a worker a hive spawned answers its
inference key but will not shut down for it (only the hive holds the worker's
admin key, and the hive's ShutdownWorker still stops it gracefully); that key
opens nothing on the hive; and a key given in argv is warned about."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.errors import from_rpc_error
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc, preflight_pb2, registry_pb2
from tests.fixtures.hive import HIVE_KEY

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), from_rpc_error(info.value).code


async def test_the_inference_key_of_a_spawned_worker_cannot_stop_it(start_hive, standin_program, model):
    hive = await start_hive(worker_binary=standin_program)
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    items = await hive.follow(reply.worker.id)
    assert items[-1].worker.state == common_pb2.WORKER_STATE_IDLE
    key = reply.worker_api_key
    async with open_channel(reply.worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        ready = await stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=auth_metadata(key), timeout=10)
        assert ready.worker_id == reply.worker.id
        assert await refused(
            stub.Shutdown(inference_pb2.ShutdownRequest(), metadata=auth_metadata(key), timeout=10)
        ) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_KEY_SCOPE")
        # The hive's own key is not the worker's admin key either.
        assert await refused(
            stub.Shutdown(inference_pb2.ShutdownRequest(), metadata=auth_metadata(HIVE_KEY), timeout=10)
        ) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
    assert [w.id for w in await hive.list()] == [reply.worker.id]
    # The worker key opens nothing on the hive, and is named as what it is.
    assert await refused(
        hive.preflight.GetHiveHealth(preflight_pb2.GetHiveHealthRequest(), metadata=auth_metadata(key), timeout=10)
    ) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_KEY_SCOPE")
    # The hive stops it through the worker's Shutdown (graceful, not a signal).
    stopped = await hive.call(hive.workers.ShutdownWorker, registry_pb2.ShutdownWorkerRequest(worker_id=reply.worker.id))
    assert not stopped.force_killed and stopped.exit_code == 0
    assert "did not take the shutdown request" not in hive.text()
    log = Path(reply.log_path).read_text()
    # The Shutdown RPC drains (the servicer narrates it); a signal would say so instead.
    assert "Draining: 0 request(s) in flight" in log and "SIGTERM received" not in log, log


async def test_a_key_on_the_command_line_is_warned_about(start_hive):
    hive = await start_hive(args=["--api-key", HIVE_KEY])
    text = hive.text()
    assert "--api-key on the command line can be read by other users" in text
    assert "RBEE_HIVE_API_KEY" in text and HIVE_KEY not in text
