"""The real worker process with the real vLLM engine (slow: marked engine)."""

from __future__ import annotations

import grpc
import pytest

from rbee.channel import open_channel
from rbee.errors import from_rpc_error
from rbee.narration import stage_of
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.engine


async def _generate(worker, **fields) -> tuple[list[inference_pb2.TokenDelta], inference_pb2.GenerateFinal]:
    async with open_channel(worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        deltas, finals = [], []
        async for msg in stub.Generate(inference_pb2.GenerateRequest(**fields), metadata=worker.metadata):
            (deltas if msg.WhichOneof("kind") == "delta" else finals).append(getattr(msg, msg.WhichOneof("kind")))
    assert len(finals) == 1, "exactly one final message"
    return deltas, finals[0]


async def test_readiness_reports_idle_and_loaded(real_worker):
    async with open_channel(real_worker.address) as channel:
        ready = await inference_pb2_grpc.InferenceServiceStub(channel).GetReadiness(
            inference_pb2.GetReadinessRequest(), metadata=real_worker.metadata
        )
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert ready.state == common_pb2.WORKER_STATE_IDLE
    assert ready.model_loaded
    assert ready.max_model_len > 0
    assert ready.engine_version
    assert ready.worker_id == real_worker.worker_id
    assert ready.slots_total >= 1 and ready.slots_busy == 0
    assert stage_of(ready.progress) == "ready"
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_loading_stages_came_from_inside_the_engine(real_worker):
    # Weights and KV-cache stages are seen only through vLLM's engine process logs.
    log = real_worker.log_text()
    for stage in ("tokenizer", "engine_start", "weights", "kv_cache", "ready"):
        assert f"] {stage}: " in log, f"stage {stage} missing from the worker log"
    assert "weights: Loading weights took" in log
    assert "[model-loader] ✅ Model loaded" in log
    assert real_worker.api_key not in log


async def test_greedy_generate_streams_contiguous_tokens(real_worker):
    deltas, final = await _generate(
        real_worker, request_id="it-greedy", prompt="Name three colours.", max_tokens=12, temperature=0.0
    )
    assert deltas, "tokens were streamed"
    expected = 0
    for d in deltas:
        assert d.index == expected, "indices continue where the previous message ended"
        assert len(d.token_ids) >= 1
        expected += len(d.token_ids)
    assert final.tokens_generated == expected
    assert 1 <= final.tokens_generated <= 12
    assert final.reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
    assert final.prompt_tokens > 3  # the chat template adds a system turn
    assert final.request_id == "it-greedy"
    assert "".join(d.text for d in deltas).strip()

    # Greedy is deterministic: the same request gives the same tokens.
    again, _ = await _generate(real_worker, prompt="Name three colours.", max_tokens=12, temperature=0.0)
    assert [t for d in again for t in d.token_ids] == [t for d in deltas for t in d.token_ids]


async def test_max_tokens_limit_ends_with_length(real_worker):
    deltas, final = await _generate(real_worker, prompt="Count from one to fifty.", max_tokens=3, temperature=0.0, ignore_eos=True)
    assert final.reason == inference_pb2.FINISH_REASON_LENGTH
    assert final.tokens_generated == 3 == sum(len(d.token_ids) for d in deltas)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(prompt="", max_tokens=5), "prompt"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", max_tokens=5, temperature=-0.5), "temperature"),
        (dict(prompt="hi", max_tokens=5, top_p=1.5), "top_p"),
        (dict(prompt="hi", max_tokens=1_000_000), "max_tokens"),
    ],
)
async def test_validation_errors_name_the_field(real_worker, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate(real_worker, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(info.value)
    assert err.code == "INVALID_ARGUMENT"
    assert err.details["field"] == field
    assert field in err.message


async def test_context_overflow_reports_the_figures(real_worker):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate(real_worker, prompt="hi", max_tokens=1_000_000)
    err = from_rpc_error(info.value)
    assert err.details["max_tokens"] == "1000000"
    assert int(err.details["max_model_len"]) > 0
    assert int(err.details["prompt_tokens"]) > 0


async def test_missing_key_is_rejected(real_worker):
    async with open_channel(real_worker.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await inference_pb2_grpc.InferenceServiceStub(channel).GetReadiness(inference_pb2.GetReadinessRequest())
    assert from_rpc_error(info.value).code == "MISSING_API_KEY"


async def test_cancel_ends_the_stream_with_cancelled(real_worker):
    async with open_channel(real_worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        call = stub.Generate(
            inference_pb2.GenerateRequest(
                request_id="it-cancel", prompt="Write a long story.", max_tokens=400, ignore_eos=True, temperature=0.0
            ),
            metadata=real_worker.metadata,
        )
        first = await call.read()
        assert first.WhichOneof("kind") == "delta"
        reply = await stub.Cancel(inference_pb2.CancelRequest(request_id="it-cancel"), metadata=real_worker.metadata)
        assert reply.cancelled
        rest = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            rest.append(msg)
        assert rest[-1].WhichOneof("kind") == "final"
        assert rest[-1].final.reason == inference_pb2.FINISH_REASON_ABORT
        assert rest[-1].final.tokens_generated < 400
        again = await stub.Cancel(inference_pb2.CancelRequest(request_id="it-cancel"), metadata=real_worker.metadata)
        assert not again.cancelled
        ready = await stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=real_worker.metadata)
        assert ready.slots_busy == 0


# A worker of one slot refusing ALL_SLOTS_BUSY, then draining a request in flight
# and exiting 0 with its engine processes gone: worker_lifecycle.feature.
