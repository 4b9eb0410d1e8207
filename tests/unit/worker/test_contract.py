"""The inference contract with the fake engine: each GenerateRequest field's
mapping onto the engine's options, each refusal, the stream's fields, model
info, load and the cancellation bound. vLLM's side of the mapping
(sampling_kwargs, position_logprobs) is checked without importing vLLM."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import pytest

from rbee.errors import from_rpc_error
from rbee.v1 import common_pb2, inference_pb2
from rbee_worker.engine import Constraint, EngineLoad, SamplingOptions
from rbee_worker.request_load import TokenRate
from rbee_worker.vllm_sampling import position_logprobs, sampling_kwargs
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import MD, worker_harness

pb = inference_pb2
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


async def _refused(h, **fields) -> tuple[grpc.StatusCode, object]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.collect(**fields)
    return info.value.code(), from_rpc_error(info.value)


# -- request → options ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "attr", "expected"),
    [
        (dict(max_tokens=7), "max_tokens", 7),
        (dict(min_tokens=2), "min_tokens", 2),
        (dict(temperature=0.5), "temperature", 0.5),
        (dict(top_p=0.25), "top_p", 0.25),
        (dict(top_k=40), "top_k", 40),
        (dict(min_p=0.125), "min_p", 0.125),
        (dict(presence_penalty=0.5), "presence_penalty", 0.5),
        (dict(frequency_penalty=-0.5), "frequency_penalty", -0.5),
        (dict(repetition_penalty=1.25), "repetition_penalty", 1.25),
        (dict(seed=1234), "seed", 1234),
        (dict(n=3, temperature=1.0), "n", 3),
        (dict(stop=["\n", "END"]), "stop", ("\n", "END")),
        (dict(stop_token_ids=[2, 7]), "stop_token_ids", (2, 7)),
        (dict(include_stop_str_in_output=True), "include_stop_str_in_output", True),
        (dict(skip_special_tokens=False), "skip_special_tokens", False),
        (dict(ignore_eos=True), "ignore_eos", True),
        (dict(logit_bias={17: -100.0, 18: 2.5}), "logit_bias", {17: -100.0, 18: 2.5}),
        (dict(logprobs=3), "logprobs", 3),
        (dict(logprobs=0), "logprobs", 0),
        (dict(prompt_logprobs=2), "prompt_logprobs", 2),
        (dict(json_schema=json.dumps(SCHEMA)), "constraint", Constraint("json_schema", json.dumps(SCHEMA))),
        (dict(regex=r"[0-9]{3}"), "constraint", Constraint("regex", r"[0-9]{3}")),
        (dict(grammar='root ::= "yes" | "no"'), "constraint", Constraint("grammar", 'root ::= "yes" | "no"')),
        (dict(choice=pb.ChoiceConstraint(choices=["red", "blue"])), "constraint", Constraint("choice", ("red", "blue"))),
    ],
)
async def test_each_field_reaches_the_engine(fields, attr, expected):
    async with worker_harness(FakeEngine(max_model_len=256)) as h:
        fields.setdefault("max_tokens", 5)
        await h.collect(request_id="f", **fields)
        assert getattr(h.engine.options["f"], attr) == expected


async def test_unset_fields_stay_unset_for_the_engine_defaults():
    async with worker_harness(FakeEngine(max_model_len=64)) as h:
        await h.collect(request_id="u", prompt="two words", max_tokens=None)
        o = h.engine.options["u"]
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "seed", "logprobs", "prompt_logprobs", "constraint"):
            assert getattr(o, name) is None, name
        assert (o.n, o.min_tokens, o.skip_special_tokens, o.include_stop_str_in_output) == (1, 0, True, False)
        # max_tokens unset: what the context leaves (64 - 4 prompt tokens).
        assert o.max_tokens == 60


async def test_model_default_max_tokens_applies_when_unset():
    engine = FakeEngine(max_model_len=64, info={"defaults": {"max_tokens": 3}})
    async with worker_harness(engine) as h:
        _, finals = await h.collect(request_id="d", prompt="hi", max_tokens=None)
        assert h.engine.options["d"].max_tokens == 3 == finals[0].tokens_generated


async def test_chat_messages_go_through_the_template():
    async with worker_harness() as h:
        chat = pb.ChatInput(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                      pb.ChatMessage(role="user", content="Name a bee.")])
        _, finals = await h.collect(request_id="c", prompt=None, chat=chat)
        assert h.engine.chats == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a bee."}]]
        assert finals[0].prompt_tokens == 2 + 2 + 2 + 3 + 2
        assert h.engine.encoded == []


async def test_token_ids_go_to_the_engine_as_they_are():
    async with worker_harness() as h:
        deltas, finals = await h.collect(request_id="t", prompt=None, token_ids=pb.TokenInput(ids=[1, 9, 8, 7]))
        assert finals[0].prompt_tokens == 4
        assert h.engine.encoded == [] and h.engine.chats == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(prompt=None), "prompt"),
        (dict(prompt=None, chat=pb.ChatInput()), "chat"),
        (dict(prompt=None, chat=pb.ChatInput(messages=[pb.ChatMessage(role="robot", content="x")])), "chat"),
        (dict(prompt=None, token_ids=pb.TokenInput()), "token_ids"),
        (dict(prompt=None, token_ids=pb.TokenInput(ids=[5000])), "token_ids"),
        (dict(prompt=None, token_ids=pb.TokenInput(ids=[5]), raw_prompt=True), "raw_prompt"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=6, max_tokens=5), "min_tokens"),
        (dict(temperature=2.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(seed=-1), "seed"),
        (dict(n=0), "n"),
        (dict(n=5), "n"),  # more than the harness's 4 slots
        (dict(n=2, temperature=0.0), "n"),
        (dict(stop_token_ids=[5001]), "stop_token_ids"),
        (dict(logit_bias={5000: 1.0}), "logit_bias"),
        (dict(logit_bias={3: 101.0}), "logit_bias"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(json_schema="{not json"), "json_schema"),
        (dict(json_schema="[1, 2]"), "json_schema"),
        (dict(regex=""), "regex"),
        (dict(grammar="  "), "grammar"),
        (dict(choice=pb.ChoiceConstraint()), "choice"),
        (dict(choice=pb.ChoiceConstraint(choices=["a", ""])), "choice"),
    ],
)
async def test_refusals_name_the_field(fields, field):
    async with worker_harness() as h:
        code, err = await _refused(h, **fields)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details["field"] == field
        assert field in err.message
        assert h.engine.started == {}


async def test_chat_refused_for_a_model_without_template():
    async with worker_harness(FakeEngine(info={"has_chat_template": False})) as h:
        code, err = await _refused(h, prompt=None, chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and err.details["field"] == "chat"


async def test_unset_max_tokens_with_a_full_context():
    async with worker_harness(FakeEngine(max_model_len=4)) as h:
        code, err = await _refused(h, prompt="two words", max_tokens=None)
        assert err.details["field"] == "prompt"


# -- the stream ----------------------------------------------------------------------


async def test_deltas_carry_running_counts_and_the_final_its_timings():
    async with worker_harness(FakeEngine(mode="slow", delay=0.002)) as h:
        deltas, finals = await h.collect(prompt="three words here", max_tokens=4)
        assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)
        assert deltas[-1].completion_tokens == 4
        assert all(d.prompt_tokens == 5 and d.cached_tokens == 1 for d in deltas)
        f = finals[0]
        assert (f.prompt_tokens, f.cached_tokens, f.tokens_generated) == (5, 1, 4)
        assert f.queue_time_ms == 2
        assert f.duration_ms >= f.time_to_first_token_ms
        assert f.reason == pb.FINISH_REASON_LENGTH and f.WhichOneof("matched_stop") is None
        assert [(c.completion, c.reason, c.tokens) for c in f.completions] == [(0, pb.FINISH_REASON_LENGTH, 4)]


@pytest.mark.parametrize(
    ("stop_reason", "which", "value"),
    [("END", "stop_string", "END"), (7, "stop_token_id", 7), (None, "stop_token_id", 1002)],
)
async def test_final_names_the_matched_stop(stop_reason, which, value):
    async with worker_harness(FakeEngine(stop_after=2, stop_reason=stop_reason)) as h:
        _, finals = await h.collect(max_tokens=9, stop=["END"], stop_token_ids=[7])
        f = finals[0]
        assert f.reason == pb.FINISH_REASON_STOP
        # None: end-of-sequence, reported as the last token's id (1000 + 2).
        assert f.WhichOneof("matched_stop") == which and getattr(f, which) == value
        assert getattr(f.completions[0], which) == value


async def test_n_completions_are_indexed_and_each_ends():
    async with worker_harness(FakeEngine(max_model_len=256)) as h:
        deltas, finals = await h.collect(n=3, temperature=0.8, max_tokens=4)
        by = {c: [d for d in deltas if d.completion == c] for c in range(3)}
        for c, ds in by.items():
            index = 0
            for d in ds:
                assert d.index == index
                index += len(d.token_ids)
            assert [t for d in ds for t in d.token_ids] == [1000 + k + 100 * c for k in range(1, 5)]
        f = finals[0]
        assert f.tokens_generated == 12
        assert [(c.completion, c.tokens, c.reason) for c in f.completions] == [
            (i, 4, pb.FINISH_REASON_LENGTH) for i in range(3)
        ]


async def test_logprobs_one_entry_per_token_top_k_sorted():
    async with worker_harness() as h:
        deltas, _ = await h.collect(max_tokens=6, logprobs=3)
        for d in deltas:
            assert len(d.logprobs) == len(d.token_ids)
            for token_id, pos in zip(d.token_ids, d.logprobs, strict=True):
                assert pos.chosen.token_id == token_id
                assert len(pos.top) == 3
                values = [t.logprob for t in pos.top]
                assert values == sorted(values, reverse=True)
                assert [t.rank for t in pos.top] == [1, 2, 3]


async def test_no_logprobs_unless_asked_and_prompt_logprobs_once():
    async with worker_harness() as h:
        deltas, _ = await h.collect(max_tokens=3)
        assert all(not d.logprobs and not d.prompt_logprobs for d in deltas)
        deltas, finals = await h.collect(max_tokens=3, prompt_logprobs=2)
        assert len(deltas[0].prompt_logprobs) == finals[0].prompt_tokens
        assert not deltas[0].prompt_logprobs[0].HasField("chosen")  # nothing precedes the first token
        assert len(deltas[0].prompt_logprobs[1].top) == 2
        assert all(not d.prompt_logprobs for d in deltas[1:])


# -- model info and load -------------------------------------------------------------


async def test_model_info():
    engine = FakeEngine(max_model_len=128, info={"defaults": {"temperature": 0.6, "top_p": 0.9}, "max_logprobs": 5})
    async with worker_harness(engine, slots=3) as h:
        m = await h.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=MD)
        assert (m.model_ref, m.max_model_len, m.max_input_len, m.vocab_size) == ("test-model", 128, 127, 5000)
        assert list(m.eos_token_ids) == [2] and m.bos_token_id == 1 and not m.HasField("pad_token_id")
        assert m.has_chat_template and m.max_logprobs == 5 and m.max_n == 3
        assert m.defaults.temperature == pytest.approx(0.6) and m.defaults.top_p == pytest.approx(0.9)
        assert m.defaults.repetition_penalty == 1.0 and m.defaults.top_k == 0
        d = m.defaults
        assert (d.min_p, d.presence_penalty, d.frequency_penalty, d.max_tokens) == (0.0, 0.0, 0.0, 0)
        assert m.engine_version == "fake-1.0" and m.worker_version and m.tokenizer_sha256 == "ab" * 32
        # The model's max_logprobs bounds the request.
        code, err = await _refused(h, logprobs=6)
        assert err.details["field"] == "logprobs"


async def test_model_info_while_loading_is_unavailable():
    async with worker_harness(FakeEngine(hold_load=True), loaded=False) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=MD)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        load = await h.stub.GetLoad(pb.GetLoadRequest(), metadata=MD)
        assert load.state == common_pb2.WORKER_STATE_LOADING


async def test_load_counts_slots_engine_queue_and_throughput():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine, slots=4) as h:
        call = h.generate(request_id="busy", max_tokens=50)
        engine.release(5)
        while (await call.read()).delta.completion_tokens < 5:
            pass
        reply = await h.stub.GetLoad(pb.GetLoadRequest(), metadata=MD)
        assert reply.state == common_pb2.WORKER_STATE_BUSY
        load = reply.load
        assert (load.slots_total, load.slots_busy, load.running_requests, load.waiting_requests) == (4, 1, 1, 0)
        assert load.generation_tokens_per_s == pytest.approx(5 / (load.window_ms / 1000))
        engine.engine_load = EngineLoad(running=1, waiting=2, kv_cache_usage=0.25)
        load = (await h.stub.GetLoad(pb.GetLoadRequest(), metadata=MD)).load
        assert (load.running_requests, load.waiting_requests, load.kv_cache_usage) == (1, 2, 0.25)
        call.cancel()


def test_token_rate_forgets_old_tokens():
    now = [100.0]
    rate = TokenRate(window_s=10, clock=lambda: now[0])
    rate.add(30)
    now[0] = 105.5
    rate.add(20)
    assert rate.rate() == 5.0
    now[0] = 110.2
    assert rate.rate() == 2.0
    now[0] = 200
    assert rate.rate() == 0.0


# -- cancellation --------------------------------------------------------------------


async def _read_until_end(call) -> list:
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


async def test_cancel_takes_several_ids_and_a_reason():
    engine = FakeEngine(mode="gated")
    async with worker_harness(engine) as h:
        calls = {i: h.generate(request_id=i, max_tokens=50) for i in ("a", "b", "c")}
        for i in calls:
            await engine.started[i].wait()
        reply = await h.stub.Cancel(
            pb.CancelRequest(request_ids=["a", "b", "gone"], reason="user pressed stop"), metadata=MD
        )
        assert reply.cancelled and list(reply.cancelled_ids) == ["a", "b"]
        for i in ("a", "b"):
            final = (await _read_until_end(calls[i]))[-1].final
            assert final.reason == pb.FINISH_REASON_ABORT and final.abort_reason == "user pressed stop"
            assert final.completions[0].reason == pb.FINISH_REASON_ABORT
        assert sorted(engine.aborted_ids) == ["a", "b"]
        # The old single-id field still works, and mixes with the list.
        reply = await h.stub.Cancel(pb.CancelRequest(request_id="c", request_ids=["c"]), metadata=MD)
        assert list(reply.cancelled_ids) == ["c"] and reply.request_id == "c"
        assert (await _read_until_end(calls["c"]))[-1].final.abort_reason == "cancelled by a client"


async def test_cancel_without_ids_is_refused():
    async with worker_harness() as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.Cancel(pb.CancelRequest(reason="x"), metadata=MD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert from_rpc_error(info.value).details["field"] == "request_ids"


# -- request ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_id", "what"),
    [
        ("x" * 129, "129 characters; at most 128"),
        ("x" * 5000, "5000 characters; at most 128"),
        ("two words", "character 3 is ' '"),
        ("line\nbreak", "character 4 is '\\n'"),
        ("nul\x00", "character 3 is '\\x00'"),
        ("caf\u00e9", "character 3 is 'é' (U+00E9)"),
        ("tab\there", "character 3 is '\\t'"),
    ],
)
async def test_request_ids_are_bounded(request_id, what):
    async with worker_harness() as h:
        code, err = await _refused(h, request_id=request_id)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details["field"] == "request_id"
        assert err.message.startswith("Invalid request_id: ") and what in err.message
        # The refusal never echoes the id itself.
        assert request_id not in err.message or len(request_id) < 20
        assert h.engine.started == {} and h.servicer.slots_busy == 0


async def test_request_ids_at_the_bound_are_accepted():
    async with worker_harness() as h:
        for rid in ("a", "x" * 128, "keeper-0123456789abcdef", "tenant/7:job.3@eu+retry=2~!", "\"'`{}[]|<>?#$%^&*()"):
            _, finals = await h.collect(request_id=rid, max_tokens=1)
            assert finals[0].request_id == rid
        # Empty: the worker makes one.
        _, finals = await h.collect(request_id="", max_tokens=1)
        assert finals[0].request_id.startswith("req-")


@pytest.mark.parametrize(
    ("fields", "field", "what"),
    [
        (dict(request_id="y" * 129), "request_id", "129 characters"),
        (dict(request_ids=["ok", "bad id"]), "request_ids", "character 3 is ' '"),
        (dict(request_ids=["ok", "z" * 200]), "request_ids", "200 characters"),
        (dict(request_ids=[f"r{i}" for i in range(1025)]), "request_ids", "1025 ids; at most 1024"),
    ],
)
async def test_cancel_ids_are_bounded_the_same_way(fields, field, what):
    async with worker_harness() as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.Cancel(pb.CancelRequest(**fields), metadata=MD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = from_rpc_error(info.value)
        assert err.details["field"] == field and what in err.message
        if "bad id" in fields.get("request_ids", []):
            assert err.details["index"] == "1"


async def test_cancel_of_1024_unknown_ids_is_fine():
    async with worker_harness() as h:
        reply = await h.stub.Cancel(pb.CancelRequest(request_ids=[f"r{i}" for i in range(1024)]), metadata=MD)
        assert not reply.cancelled and list(reply.cancelled_ids) == []


async def test_after_cancel_the_engine_takes_at_most_one_more_step():
    # The fake's steps run on their own like an engine core's, read or not;
    # only abort() stops them. Counted, not timed.
    engine = FakeEngine(mode="engine", delay=0.005, max_model_len=4096)
    async with worker_harness(engine, slots=1) as h:
        call = h.generate(request_id="s", max_tokens=1000)
        await call.read()
        await h.stub.Cancel(pb.CancelRequest(request_ids=["s"]), metadata=MD)
        at_reply = engine.steps["s"]
        await _read_until_end(call)
        # Until the engine's steps for it have stopped (they only stop at abort()).
        await asyncio.wait_for(engine.steps_ended(), 30)
        assert engine.steps["s"] - at_reply <= 1
        assert engine.steps["s"] < 1000


async def test_after_a_disconnect_the_engine_takes_at_most_two_more_steps():
    engine = FakeEngine(mode="engine", delay=0.005, max_model_len=4096)
    async with worker_harness(engine, slots=1) as h:
        call = h.generate(request_id="d", max_tokens=1000)
        await call.read()
        at_cancel = engine.steps["d"]
        call.cancel()
        await asyncio.wait_for(engine.aborted["d"].wait(), 10)
        await asyncio.wait_for(engine.steps_ended(), 30)
        assert engine.steps["d"] - at_cancel <= 2
        assert h.servicer.slots_busy == 0


# -- vLLM's side of the mapping (no vLLM import) ------------------------------------------


def test_sampling_kwargs_defaults_then_request_fields():
    opts = SamplingOptions(
        max_tokens=9, temperature=0.3, top_k=5, seed=7, n=2, min_tokens=1, stop=("x",), stop_token_ids=(4,),
        include_stop_str_in_output=True, skip_special_tokens=False, logit_bias={3: 1.5}, logprobs=2,
        prompt_logprobs=1, presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1, min_p=0.05, top_p=0.8,
    )
    kw = sampling_kwargs(opts, {"temperature": 0.6, "top_p": 0.95, "max_tokens": 50})
    assert kw == dict(
        temperature=0.3, top_p=0.8, top_k=5, min_p=0.05, presence_penalty=0.1, frequency_penalty=0.2,
        repetition_penalty=1.1, seed=7, n=2, max_tokens=9, min_tokens=1, stop=["x"], stop_token_ids=[4],
        include_stop_str_in_output=True, skip_special_tokens=False, ignore_eos=False, logit_bias={3: 1.5},
        logprobs=2, prompt_logprobs=1,
    )
    unset = sampling_kwargs(SamplingOptions(max_tokens=4), {"temperature": 0.6})
    assert unset["temperature"] == 0.6 and "top_p" not in unset and unset["stop"] is None
    assert unset["logprobs"] is None and unset["logit_bias"] is None


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (Constraint("json_schema", json.dumps(SCHEMA)), {"json": SCHEMA}),
        (Constraint("regex", "a+"), {"regex": "a+"}),
        (Constraint("grammar", "root ::= x"), {"grammar": "root ::= x"}),
        (Constraint("choice", ("a", "b")), {"choice": ["a", "b"]}),
    ],
)
def test_sampling_kwargs_structured_outputs(constraint, expected):
    assert sampling_kwargs(SamplingOptions(max_tokens=1, constraint=constraint), {})["structured_outputs"] == expected


def test_position_logprobs_chosen_and_sorted_top():
    lp = lambda v, r, t: SimpleNamespace(logprob=v, rank=r, decoded_token=t)  # noqa: E731
    entries = {10: lp(-3.0, 4, "x"), 11: lp(-0.5, 1, "a"), 12: lp(-1.0, 2, "b"), 13: lp(-2.0, 3, "c")}
    p = position_logprobs(entries, 10, 2)
    assert (p.chosen.token_id, p.chosen.rank, p.chosen.token) == (10, 4, "x")
    assert [(t.token_id, t.rank) for t in p.top] == [(11, 1), (12, 2)]
    assert position_logprobs(entries, 11, 0).top == ()
    assert position_logprobs(None, 1, 2) is None
