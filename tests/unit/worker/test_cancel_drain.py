"""Cancel by id, client disconnect, and draining on shutdown."""

from __future__ import annotations

import asyncio

import grpc

from rbee.v1 import common_pb2, inference_pb2
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import MD, worker_harness


async def _read_all(call) -> list[inference_pb2.GenerateResponse]:
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


async def _cancel(h, request_id: str) -> inference_pb2.CancelResponse:
    return await h.stub.Cancel(inference_pb2.CancelRequest(request_id=request_id), metadata=MD)


async def test_cancel_is_idempotent_and_ends_the_stream_with_cancelled():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine) as h:
        unknown = await _cancel(h, "nobody")
        assert (unknown.cancelled, unknown.request_id) == (False, "nobody")

        call = h.generate(request_id="c1", max_tokens=50)
        engine.release(2)
        first = await call.read()
        assert first.delta.index == 0

        reply = await _cancel(h, "c1")
        assert reply.cancelled
        assert engine.aborted_ids.count("c1") >= 1
        rest = await _read_all(call)
        assert rest[-1].final.reason == inference_pb2.FINISH_REASON_ABORT
        assert rest[-1].final.tokens_generated < 50
        assert sum(1 for m in rest if m.HasField("final")) == 1
        assert await call.code() == grpc.StatusCode.OK

        twice = await _cancel(h, "c1")
        assert not twice.cancelled
        assert (await h.readiness()).slots_busy == 0
        assert "Cancelled c1" in h.log.getvalue()


async def test_cancel_of_a_finished_request_is_ok():
    async with worker_harness() as h:
        _, finals = await h.collect(request_id="done", max_tokens=2)
        assert finals[0].reason == inference_pb2.FINISH_REASON_LENGTH
        reply = await _cancel(h, "done")
        assert not reply.cancelled
        assert h.engine.aborted_ids == []


async def test_client_disconnect_mid_step_aborts_and_frees_the_slot():
    # "hang": the engine is stuck inside a step and produces nothing, so only
    # the disconnect itself can end the request.
    engine = FakeEngine(mode="hang")
    async with worker_harness(engine, slots=1) as h:
        call = h.generate(request_id="gone", max_tokens=10)
        await engine.started["gone"].wait()
        assert (await h.readiness()).slots_busy == 1
        call.cancel()
        await asyncio.wait_for(engine.aborted["gone"].wait(), 30)
        ready = await h.readiness()
        assert ready.slots_busy == 0
        assert ready.state == common_pb2.WORKER_STATE_IDLE
        assert "Client disconnected from gone" in h.log.getvalue()
        # The one slot serves the next request.
        engine.mode = "fast"
        _, finals = await h.collect(request_id="next", max_tokens=2)
        assert finals[0].tokens_generated == 2


async def test_client_disconnect_while_tokens_flow():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine, slots=1) as h:
        call = h.generate(request_id="mid", max_tokens=50)
        engine.release(3)
        await call.read()
        call.cancel()
        await asyncio.wait_for(engine.aborted["mid"].wait(), 30)
        assert (await h.readiness()).slots_busy == 0


async def test_drain_lets_in_flight_requests_finish():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine) as h:
        call = h.generate(request_id="inflight", max_tokens=3)
        await engine.started["inflight"].wait()
        reply = await h.stub.Shutdown(inference_pb2.ShutdownRequest(drain_timeout_ms=7000), metadata=MD)
        assert reply.state == common_pb2.WORKER_STATE_DRAINING
        assert reply.in_flight == 1
        assert h.shutdown_requests == [7.0]
        drain = asyncio.create_task(h.servicer.drain(60))

        refused = h.generate(request_id="late")
        try:
            await _read_all(refused)
            raise AssertionError("a new request was accepted while draining")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        engine.release(3)
        messages = await _read_all(call)
        assert messages[-1].final.reason == inference_pb2.FINISH_REASON_LENGTH
        assert messages[-1].final.tokens_generated == 3
        assert await drain == 0
        assert engine.aborted_ids == []


async def test_drain_timeout_cancels_what_is_left():
    engine = FakeEngine(mode="hang")
    async with worker_harness(engine) as h:
        calls = [h.generate(request_id=f"stuck{i}", max_tokens=10) for i in range(2)]
        for i in range(2):
            await engine.started[f"stuck{i}"].wait()
        cut = await h.servicer.drain(0.05)
        assert cut == 2
        for call in calls:
            messages = await _read_all(call)
            assert messages[-1].final.reason == inference_pb2.FINISH_REASON_ABORT
        assert sorted(engine.aborted_ids) == ["stuck0", "stuck1"]
        assert h.servicer.slots_busy == 0
        assert "Drain timeout" in h.log.getvalue()
