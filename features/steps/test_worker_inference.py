"""Steps for worker_inference.feature, against the shared real worker."""

from __future__ import annotations

import signal

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from rbee.v1 import common_pb2, inference_pb2
from features.steps.worker_support import (
    PROMPT,
    generate_all,
    keeper_exit_code,
    readiness,
    request,
    rpc_error,
    run_keeper,
    scenario_state,
    slots_free,
    stub,
    the_shared_worker,
    track_stream,
    wait_until,
)

pytestmark = pytest.mark.engine

scenarios("worker_inference.feature")


ctx_fixture = pytest.fixture(scenario_state, name="ctx")
given("a worker with the default model loaded", target_fixture="worker")(the_shared_worker)


# -- streaming ---------------------------------------------------------------


def _deltas(messages):
    return [m.delta for m in messages if m.HasField("delta")]


@when(parsers.parse("a client asks for {n:d} tokens greedily"))
def _ask_greedy(worker, ctx, n):
    ctx["messages"] = generate_all(worker, **_fields(request(n, temperature=0.0)))


@when(parsers.parse("a client asks for {n:d} tokens greedily again"))
def _ask_greedy_again(worker, ctx, n):
    ctx["first_answer"] = ctx["messages"]
    ctx["messages"] = generate_all(worker, **_fields(request(n, temperature=0.0)))


def _fields(req: inference_pb2.GenerateRequest) -> dict:
    return {field.name: value for field, value in req.ListFields()}


@then("the token indices start at 0 and have no gaps")
def _indices(ctx):
    deltas = _deltas(ctx["messages"])
    assert deltas, "no tokens streamed"
    expected = 0
    for delta in deltas:
        assert delta.index == expected
        assert delta.token_ids, "a delta without tokens"
        expected += len(delta.token_ids)


@then("the stream ends with exactly one final event")
def _one_final(ctx):
    kinds = [m.WhichOneof("kind") for m in ctx["messages"]]
    assert kinds.count("final") == 1 and kinds[-1] == "final"


@then("the final event counts the streamed tokens and gives a finish reason and a duration")
def _final_counts(ctx):
    final = ctx["messages"][-1].final
    streamed = sum(len(d.token_ids) for d in _deltas(ctx["messages"]))
    assert final.tokens_generated == streamed
    assert final.reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
    assert final.duration_ms > 0 and final.prompt_tokens > 0


@then("both answers have the same token ids")
def _same_ids(ctx):
    ids = [[i for d in _deltas(msgs) for i in d.token_ids] for msgs in (ctx["first_answer"], ctx["messages"])]
    assert ids[0] and ids[0] == ids[1]


# -- rbee-keeper ---------------------------------------------------------------


@when(parsers.parse("I run rbee-keeper infer against the worker for {n:d} tokens greedily"))
def _keeper_greedy(worker, keeper, ctx, n):
    ctx["n"] = n
    run_keeper(ctx, keeper, "infer", "--worker", worker.address, "--prompt", PROMPT, "--max-tokens", str(n),
               "--temperature", "0", env={"RBEE_API_KEY": worker.api_key})


then(parsers.parse("rbee-keeper exits with code {code:d}"))(keeper_exit_code)


@then("its stdout is exactly the text the worker streams for the same request")
def _keeper_stdout(worker, ctx):
    messages = generate_all(worker, **_fields(request(ctx["n"], temperature=0.0)))
    text = "".join(d.text for d in _deltas(messages))
    assert text and ctx["keeper"].stdout == text + ("" if text.endswith("\n") else "\n")


@then("its last line on stderr gives the token count and tokens per second")
def _keeper_summary(ctx):
    last = ctx["keeper"].stderr.strip().splitlines()[-1]
    assert "tokens in" in last and "tokens/s" in last, last


# -- cancelling ----------------------------------------------------------------


@given("a long request is streaming", target_fixture="stream")
def _long_stream(worker, ctx):
    return track_stream(ctx, worker, 1500)


def _cancel(worker, request_id: str) -> inference_pb2.CancelResponse:
    channel, s = stub(worker)
    with channel:
        return s.Cancel(inference_pb2.CancelRequest(request_id=request_id), metadata=worker.metadata, timeout=10)


@when("the client cancels it by its request id")
def _cancel_it(worker, stream, ctx):
    ctx.setdefault("cancels", []).append(_cancel(worker, stream.request_id))


@when("the client cancels it again")
def _cancel_again(worker, stream, ctx):
    ctx["cancels"].append(_cancel(worker, stream.request_id))


@when("the client cancels a request id the worker never saw")
def _cancel_unknown(worker, ctx):
    ctx["cancels"].append(_cancel(worker, "never-seen-request"))


@then(parsers.parse('the stream ends with finish reason "{reason}"'))
def _stream_reason(stream, reason):
    stream.rest()
    assert stream.final.reason == inference_pb2.FinishReason.Value(f"FINISH_REASON_{reason.upper()}")
    assert stream.final.tokens_generated < 1500


@then("the worker shows no busy slot")
def _no_busy_slot(worker):
    ready = readiness(worker)
    assert ready.slots_busy == 0 and ready.state == common_pb2.WORKER_STATE_IDLE


@then("no cancel failed")
def _no_cancel_failed(ctx):
    assert len(ctx["cancels"]) == 3  # each call returned a reply rather than raising


@then("only the first cancel stopped a running request")
def _first_cancel_only(ctx):
    assert [c.cancelled for c in ctx["cancels"]] == [True, False, False]


@when("the client closes its connection")
def _client_goes(stream):
    stream.close()


@then("the worker frees the slot and logs that the client disconnected")
def _slot_freed(worker, stream):
    wait_until(lambda: slots_free(worker), "the worker frees the slot")
    wait_until(lambda: f"Client disconnected from {stream.request_id}" in worker.log_text(), "the worker logs it")


# -- Ctrl+C --------------------------------------------------------------------


@given("rbee-keeper is streaming a long answer from the worker")
def _keeper_streaming(worker, keeper, ctx):
    run = keeper("infer", "--worker", worker.address, "--prompt", PROMPT, "--max-tokens", "1500", "--ignore-eos",
                 env={"RBEE_API_KEY": worker.api_key})
    run.wait_for_stdout(10)
    ctx["keeper"] = run


@when("the user presses Ctrl+C")
def _ctrl_c(ctx):
    ctx["keeper"].send_signal(signal.SIGINT)
    ctx["code"] = ctx["keeper"].finish()


@then("rbee-keeper says the worker confirmed the cancel")
def _keeper_confirmed(ctx):
    assert "the worker confirmed" in ctx["keeper"].stderr, ctx["keeper"].describe()


# -- refusals ------------------------------------------------------------------


def _value(field: str, text: str):
    if field == "prompt":
        return text.strip('"')
    return float(text) if field in ("temperature", "top_p") else int(text)


@when(parsers.parse("a client sends a request with {field} set to {value}"))
def _bad_field(worker, ctx, field, value):
    fields = {"prompt": PROMPT, "max_tokens": 4, field: _value(field, value)}
    ctx["error"] = rpc_error(lambda: generate_all(worker, **fields))


@when(parsers.parse("a client asks for {n:d} tokens"))
def _ask_many(worker, ctx, n):
    ctx["error"] = rpc_error(lambda: generate_all(worker, prompt=PROMPT, max_tokens=n))


@then(parsers.parse('the request fails with INVALID_ARGUMENT naming the field "{field}"'))
def _invalid_field(ctx, field):
    err = ctx["error"]
    assert err.code == "INVALID_ARGUMENT" and err.details.get("field") == field, err


@then("the error gives the prompt tokens, the max tokens and the model's context length")
def _context_figures(ctx):
    details = ctx["error"].details
    assert int(details["max_tokens"]) == 100000
    assert int(details["prompt_tokens"]) > 0 and int(details["max_model_len"]) > 0
