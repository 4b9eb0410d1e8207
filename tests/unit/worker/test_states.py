"""Worker states as the servicer shows them: loading, idle, busy, failed, draining."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import stage_of
from rbee.v1 import common_pb2, inference_pb2
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import MD, worker_harness

WS = common_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_loading_then_idle_with_progress_stream():
    engine = FakeEngine(hold_load=True)
    async with worker_harness(engine, loaded=False) as h:
        loading = asyncio.create_task(h.load())
        ready = await h.readiness()
        assert ready.state == WS.WORKER_STATE_LOADING
        assert not ready.model_loaded
        assert stage_of(ready.progress) == "weights"  # the latest stage the fake reported
        assert ready.max_model_len == 0
        assert await h.health_status() == NOT_SERVING
        assert await h.health_status("rbee.v1.InferenceService") == NOT_SERVING

        # Requests are refused while loading, with the stage.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        err = from_rpc_error(info.value)
        assert err.code == "MODEL_LOADING"
        assert err.details["stage"] == "weights"

        stream = h.stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=MD)
        first = await stream.read()
        assert first.state == WS.WORKER_STATE_LOADING
        assert stage_of(first.progress) == "weights"
        engine.load_gate.set()
        rest = []
        while (msg := await stream.read()) is not grpc.aio.EOF:
            rest.append(msg)
        await loading
        assert any(stage_of(m.progress) == "ready" for m in rest)
        assert rest[-1].state == WS.WORKER_STATE_IDLE

        ready = await h.readiness()
        assert ready.state == WS.WORKER_STATE_IDLE
        assert ready.model_loaded
        assert ready.max_model_len == 64
        assert ready.engine_version == "fake-1.0"
        assert ready.worker_version
        assert (ready.worker_id, ready.model_ref, ready.backend) == ("w-unit", "test-model", common_pb2.BACKEND_CPU)
        assert await h.health_status() == SERVING
        assert await h.health_status("rbee.v1.InferenceService") == SERVING


async def test_progress_stream_after_loading_sends_one_message():
    async with worker_harness() as h:
        messages = [m async for m in h.stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=MD)]
        assert len(messages) == 1
        assert messages[0].state == WS.WORKER_STATE_IDLE
        assert stage_of(messages[0].progress) == "ready"


async def test_busy_while_a_request_runs_then_idle():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine) as h:
        call = h.generate(request_id="r1", max_tokens=2)
        await engine.started["r1"].wait()
        ready = await h.readiness()
        assert ready.state == WS.WORKER_STATE_BUSY
        assert (ready.slots_total, ready.slots_busy) == (4, 1)
        assert await h.health_status() == SERVING  # busy with free slots still serves
        engine.release(2)
        messages = [m async for m in call]
        assert messages[-1].final.reason == inference_pb2.FINISH_REASON_LENGTH
        ready = await h.readiness()
        assert ready.state == WS.WORKER_STATE_IDLE
        assert ready.slots_busy == 0


async def test_failed_load_fails_the_progress_stream_and_requests():
    engine = FakeEngine(
        hold_load=True,
        load_error=RbeeError("MODEL_LOAD_FAILED", "Loading model /models/test failed: bad config", {"model_path": "/models/test"}),
    )
    async with worker_harness(engine, loaded=False) as h:
        stream = h.stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=MD)
        assert (await stream.read()).state == WS.WORKER_STATE_LOADING
        engine.load_gate.set()
        await h.load()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await stream.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        err = from_rpc_error(info.value)
        assert err.code == "MODEL_LOAD_FAILED"
        assert "bad config" in err.message

        assert (await h.readiness()).state == WS.WORKER_STATE_FAILED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect()
        assert from_rpc_error(info.value).code == "MODEL_LOAD_FAILED"
        assert await h.health_status() == NOT_SERVING


async def test_draining_refuses_new_requests_and_stops_serving():
    async with worker_harness() as h:
        reply = await h.stub.Shutdown(inference_pb2.ShutdownRequest(), metadata=MD)
        assert reply.state == WS.WORKER_STATE_DRAINING
        assert reply.in_flight == 0
        assert h.shutdown_requests == [30.0]  # default drain timeout
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert from_rpc_error(info.value).code == "WORKER_DRAINING"
        assert await h.health_status() == NOT_SERVING
        assert (await h.readiness()).state == WS.WORKER_STATE_DRAINING
