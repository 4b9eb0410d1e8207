"""API keys on the worker and the error map in both directions."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.errors import CODES, RbeeError, from_rpc_error
from rbee.v1 import inference_pb2
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import worker_harness


@pytest.mark.parametrize(
    ("md", "code"),
    [((), "MISSING_API_KEY"), (auth_metadata("wrong-key"), "INVALID_API_KEY"), ((("authorization", "Basic x"),), "INVALID_API_KEY")],
)
async def test_rpcs_need_the_key(md, code):
    async with worker_harness() as h:
        for call in (
            lambda: h.stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=md),
            lambda: h.stub.Cancel(inference_pb2.CancelRequest(request_id="x"), metadata=md),
            lambda: h.stub.Shutdown(inference_pb2.ShutdownRequest(), metadata=md),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert from_rpc_error(info.value).code == code
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in h.stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=1), metadata=md):
                pass
        assert from_rpc_error(info.value).code == code
        assert h.engine.started == {}
        assert h.shutdown_requests == []  # an unauthenticated Shutdown did nothing


async def test_health_is_open_without_a_key():
    async with worker_harness() as h:
        reply = await health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "err",
    [
        RbeeError("ALL_SLOTS_BUSY", "All 2 slots are busy", {"slots_total": 2, "slots_busy": 2}, ["Retry"]),
        RbeeError("MODEL_LOADING", "still loading", {"stage": "weights"}),
        RbeeError("WORKER_DRAINING", "shutting down"),
        RbeeError("DUPLICATE_REQUEST_ID", "dup", {"request_id": "x"}),
        RbeeError("MODEL_LOAD_FAILED", "broken weights", {"model_path": "/m"}, ["Check the log"]),
        RbeeError("INVALID_ARGUMENT", "Invalid prompt: empty", {"field": "prompt"}),
        RbeeError("INTERNAL", "boom"),
        RbeeError("SOMETHING_NEW", "an unlisted code still travels"),
    ],
    ids=lambda e: e.code,
)
async def test_rbee_error_survives_the_wire(err):
    # The fake engine raises while encoding: the servicer must turn it into a
    # status that the client turns back into the same error.
    async with worker_harness(FakeEngine(encode_error=err)) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect()
        assert info.value.code() == CODES.get(err.code, grpc.StatusCode.INTERNAL)
        back = from_rpc_error(info.value)
        assert (back.code, back.message, back.details, back.suggestions) == (
            err.code, err.message, err.details, err.suggestions,
        )


async def test_unexpected_exception_becomes_internal_with_an_id_and_no_exception_text(caplog):
    """The reply says that an internal error happened, its id and where the
    log is; the exception's text (paths, data of the node) stays in the log."""

    class Broken(FakeEngine):
        def encode(self, prompt, raw_prompt):
            raise PermissionError(13, "Permission denied", "/proc/1/cwd")

    caplog.set_level(logging.ERROR, logger="rbee.rpc")
    async with worker_harness(Broken()) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        back = from_rpc_error(info.value)
    assert back.code == "INTERNAL"
    error_id = back.details["error_id"]
    assert back.message == f"Internal error (id {error_id}); the details are in {back.details['log']}"
    reply = " ".join([back.message, *back.details.values(), *back.suggestions, info.value.details() or ""])
    for leaked in ("PermissionError", "/proc/1/cwd", "Permission denied", "Traceback"):
        assert leaked not in reply
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info and isinstance(logged[0].exc_info[1], PermissionError)


async def test_engine_failure_mid_stream_is_an_internal_status():
    class FailsMidway(FakeEngine):
        async def generate(self, request_id, prompt_token_ids, options):
            yield await self._one()
            raise RuntimeError("engine core died")

        async def _one(self):
            from rbee_worker.engine import Delta

            return Delta(token_ids=[7], text="x", prompt_tokens=1)

    async with worker_harness(FailsMidway()) as h:
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for msg in h.generate(request_id="dies", max_tokens=5):
                got.append(msg)
        assert got and got[0].delta.token_ids == [7]
        back = from_rpc_error(info.value)
        assert back.code == "INTERNAL"
        assert back.message.startswith("The engine failed during generation (id ")
        assert "engine core died" not in back.message and "RuntimeError" not in back.message
        assert back.details["tokens_generated"] == "1" and back.details["error_id"]
        assert h.servicer.slots_busy == 0


@pytest.mark.parametrize(
    ("status", "code"),
    [
        # Only a worker's own ErrorInfo means ALL_SLOTS_BUSY (retried by the keeper).
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (grpc.StatusCode.DATA_LOSS, "INTERNAL"),
    ],
)
async def test_bare_status_falls_back_by_status_code(status, code):
    # A peer that is not an rbee daemon (a proxy, grpc itself) sends no details.
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(status, "plain status")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Bare", {"Call": grpc.unary_unary_rpc_method_handler(handler)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Bare/Call")(b"")
        back = from_rpc_error(info.value, target=f"127.0.0.1:{port}")
        assert back.code == code
        assert back.details["grpc_status"] == status.name
    finally:
        await server.stop(None)
