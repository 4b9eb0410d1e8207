"""Token streams, coalescing, slots and input validation."""

from __future__ import annotations

import grpc
import pytest

from rbee.errors import from_rpc_error
from rbee.v1 import inference_pb2
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import worker_harness


def _contiguous(deltas) -> int:
    expected = 0
    for d in deltas:
        assert d.index == expected
        assert d.token_ids
        expected += len(d.token_ids)
    return expected


async def test_stream_then_exactly_one_final():
    async with worker_harness(FakeEngine(stop_after=3)) as h:
        deltas, finals = await h.collect(request_id="abc", prompt="say three words", max_tokens=10, temperature=0.0)
        assert len(finals) == 1
        final = finals[0]
        assert _contiguous(deltas) == 3 == final.tokens_generated
        assert "".join(d.text for d in deltas) == "t1 t2 t3 "
        assert final.reason == inference_pb2.FINISH_REASON_STOP
        assert final.prompt_tokens == 5  # 3 words + the fake's 2 template tokens
        assert final.request_id == "abc"
        assert final.duration_ms >= final.time_to_first_token_ms
        opts = h.engine.options["abc"]
        assert (opts.max_tokens, opts.temperature, opts.top_p) == (10, 0.0, None)  # unset stays unset
        assert h.engine.encoded == [("say three words", False)]
        assert "Request abc: 3 tokens" in h.log.getvalue()


async def test_max_tokens_gives_length_and_sampling_options_pass_through():
    async with worker_harness() as h:
        deltas, finals = await h.collect(
            request_id="r", max_tokens=4, top_p=0.5, top_k=7, seed=42, stop=["\n"], raw_prompt=True, ignore_eos=True
        )
        assert finals[0].reason == inference_pb2.FINISH_REASON_LENGTH
        assert _contiguous(deltas) == 4
        opts = h.engine.options["r"]
        assert (opts.top_p, opts.top_k, opts.seed, tuple(opts.stop), opts.ignore_eos) == (0.5, 7, 42, ("\n",), True)
        assert opts.temperature is None  # unset → the model's default, applied by the engine
        assert h.engine.encoded[-1] == ("hello there", True)


async def test_empty_request_id_gets_one():
    async with worker_harness() as h:
        _, finals = await h.collect(max_tokens=1)
        assert finals[0].request_id.startswith("req-")


async def test_tokens_ready_together_travel_in_one_message():
    # Bursts of 4 tokens with no await between them: every burst must share a message.
    engine = FakeEngine(mode="fast", burst=4, max_model_len=10_000)
    async with worker_harness(engine) as h:
        deltas, finals = await h.collect(max_tokens=2000)
        assert _contiguous(deltas) == 2000 == finals[0].tokens_generated
        assert len(deltas) <= 2000 // 4
        assert len(deltas) < finals[0].tokens_generated


async def test_without_coalescing_each_engine_delta_is_a_message():
    engine = FakeEngine(mode="fast", burst=4, max_model_len=10_000)
    async with worker_harness(engine, coalesce=False) as h:
        deltas, finals = await h.collect(max_tokens=200)
        assert len(deltas) == 200 == _contiguous(deltas)


async def test_all_slots_busy_answers_at_once_with_the_figures():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine, slots=2) as h:
        calls = [h.generate(request_id=f"r{i}") for i in range(2)]
        for i in range(2):
            await engine.started[f"r{i}"].wait()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect(request_id="r3")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        err = from_rpc_error(info.value)
        assert err.code == "ALL_SLOTS_BUSY"
        assert err.details == {"slots_total": "2", "slots_busy": "2"}
        assert err.suggestions
        assert "r3" not in engine.started  # refused before reaching the engine
        assert len(engine.encoded) == 2  # ... and before the tokenizer
        engine.release(10)
        for call in calls:
            assert [m async for m in call][-1].final.reason == inference_pb2.FINISH_REASON_LENGTH
        # Slots are free again.
        engine.mode = "fast"
        _, finals = await h.collect(request_id="r4", max_tokens=1)
        assert finals[0].tokens_generated == 1


async def test_duplicate_in_flight_request_id():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine) as h:
        first = h.generate(request_id="same")
        await engine.started["same"].wait()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect(request_id="same")
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        err = from_rpc_error(info.value)
        assert err.code == "DUPLICATE_REQUEST_ID"
        assert err.details["request_id"] == "same"
        engine.release(5)
        assert [m async for m in first][-1].HasField("final")
        # Finished ids may be reused.
        engine.release(5)
        _, finals = await h.collect(request_id="same")
        assert finals[0].request_id == "same"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="   \n"), "prompt"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=["ok", ""]), "stop"),
    ],
)
async def test_validation_names_the_field(fields, field):
    async with worker_harness() as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect(**fields)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = from_rpc_error(info.value)
        assert err.code == "INVALID_ARGUMENT"
        assert err.details["field"] == field
        assert field in err.message
        assert h.engine.started == {}


async def test_prompt_plus_max_tokens_beyond_the_context_names_the_figures():
    async with worker_harness(FakeEngine(max_model_len=64)) as h:
        # 2 template tokens + 2 words = 4 prompt tokens; 4 + 61 = 65 > 64.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect(prompt="two words", max_tokens=61)
        err = from_rpc_error(info.value)
        assert err.details == {"field": "max_tokens", "prompt_tokens": "4", "max_tokens": "61", "max_model_len": "64"}
        assert "65" in err.message and "64" in err.message
        assert any("60" in s for s in err.suggestions)
        # Exactly at the limit is fine.
        _, finals = await h.collect(prompt="two words", max_tokens=60)
        assert finals[0].tokens_generated == 60


async def test_prompt_alone_too_long():
    async with worker_harness(FakeEngine(max_model_len=8)) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.collect(prompt="one two three four five six", max_tokens=1)
        err = from_rpc_error(info.value)
        assert err.details["field"] == "prompt"
        assert err.details["prompt_tokens"] == "8"
