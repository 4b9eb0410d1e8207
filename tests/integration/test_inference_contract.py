"""The inference contract through the real engine (vLLM CPU, default model):
the session's shared worker (``real_worker``, the cpu default of slots). Each test is written against the generated
stubs only, as a programmatic client would be."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from rbee_worker.settings import DEFAULT_SLOTS
from tests.fixtures.worker import WorkerProcess

pytestmark = pytest.mark.engine
pb = inference_pb2

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


SLOTS = DEFAULT_SLOTS["cpu"]
EOS = 2  # the default model's end-of-sequence token, <|im_end|>


@pytest.fixture(scope="module")
def worker(real_worker: WorkerProcess) -> WorkerProcess:
    """Nothing here stops or kills it: the engine start is shared with the other modules."""
    return real_worker


@pytest.fixture(scope="module")
def stub(worker: WorkerProcess):
    channel = grpc.insecure_channel(worker.address)
    yield inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()


class Result:
    def __init__(self, messages: list[pb.GenerateResponse]) -> None:
        self.deltas = [m.delta for m in messages if m.HasField("delta")]
        finals = [m.final for m in messages if m.HasField("final")]
        assert len(finals) == 1 and messages[-1].HasField("final")
        self.final = finals[0]

    def ids(self, completion: int = 0) -> list[int]:
        return [t for d in self.deltas if d.completion == completion for t in d.token_ids]

    def text(self, completion: int = 0) -> str:
        return "".join(d.text for d in self.deltas if d.completion == completion)


def generate(stub, worker: WorkerProcess, **fields) -> Result:
    fields.setdefault("max_tokens", 24)
    if not {"prompt", "chat", "token_ids"} & fields.keys():
        fields["prompt"] = "Name three flowers that honey bees like."
    return Result(list(stub.Generate(pb.GenerateRequest(**fields), metadata=worker.metadata, timeout=300)))


def chat(*turns: tuple[str, str]) -> pb.ChatInput:
    return pb.ChatInput(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns])


def test_model_info(stub, worker):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=worker.metadata, timeout=10)
    assert info.vocab_size == 49152 and 2 in info.eos_token_ids
    assert info.max_model_len == 2048 and info.max_input_len == 2047
    assert info.has_chat_template and info.bos_token_id == 1
    assert len(info.tokenizer_sha256) == 64 and info.engine_version and info.worker_version
    # SmolLM2's generation config sets no sampling values: vLLM's neutral ones.
    assert (info.defaults.temperature, info.defaults.top_p, info.defaults.repetition_penalty) == (1.0, 1.0, 1.0)
    assert info.max_logprobs == 20 and info.max_n == SLOTS


def test_same_seed_same_tokens(stub, worker):
    a = generate(stub, worker, temperature=1.0, seed=1234, max_tokens=16)
    b = generate(stub, worker, temperature=1.0, seed=1234, max_tokens=16)
    assert a.ids() == b.ids() and len(a.ids()) > 0


def test_json_schema_output_validates(stub, worker):
    r = generate(stub, worker, chat=chat(("user", "Make up a person. Reply with JSON: name and age.")),
                 json_schema=json.dumps(SCHEMA), temperature=0.0, max_tokens=60)
    assert r.final.reason == pb.FINISH_REASON_STOP, r.text()
    jsonschema.validate(json.loads(r.text()), SCHEMA)


def test_choice_yields_one_of_the_choices(stub, worker):
    choices = ["red", "green", "blue"]
    r = generate(stub, worker, prompt="What colour is the sky on a clear day?",
                 choice=pb.ChoiceConstraint(choices=choices), temperature=0.0)
    assert r.text() in choices


def test_logprobs_present_and_sorted(stub, worker):
    r = generate(stub, worker, logprobs=3, prompt_logprobs=2, temperature=0.0, max_tokens=12)
    assert r.deltas[0].prompt_logprobs and len(r.deltas[0].prompt_logprobs) == r.final.prompt_tokens
    assert all(p.HasField("chosen") for p in r.deltas[0].prompt_logprobs[1:])
    positions = 0
    for d in r.deltas:
        assert len(d.logprobs) == len(d.token_ids)
        for token_id, p in zip(d.token_ids, d.logprobs, strict=True):
            positions += 1
            assert p.chosen.token_id == token_id and p.chosen.logprob <= 0
            assert len(p.top) == 3
            values = [t.logprob for t in p.top]
            assert values == sorted(values, reverse=True)
            assert [t.rank for t in p.top] == [1, 2, 3]
            # Greedy: the chosen token is the likeliest one.
            assert p.top[0].token_id == token_id and p.chosen.rank == 1
    assert positions == r.final.tokens_generated > 0


def test_stop_string_and_stop_token_end_the_stream(stub, worker):
    free = generate(stub, worker, temperature=0.0, max_tokens=30, ignore_eos=True)
    text, ids = free.text(), free.ids()
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = generate(stub, worker, temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.final.reason == pb.FINISH_REASON_STOP
    assert cut.final.WhichOneof("matched_stop") == "stop_string" and cut.final.stop_string == stop
    assert cut.text() == text[: text.index(stop)]
    # A token id from the middle of the free run.
    token = ids[len(ids) // 2]
    by_token = generate(stub, worker, temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[token])
    assert by_token.final.reason == pb.FINISH_REASON_STOP
    assert by_token.final.WhichOneof("matched_stop") == "stop_token_id" and by_token.final.stop_token_id == token
    assert by_token.ids() == ids[: ids.index(token) + 1]
    assert by_token.final.completions[0].stop_token_id == token


def test_chat_messages_equal_the_template_applied_by_hand(stub, worker, default_model):
    from transformers import AutoTokenizer

    turns = (("system", "You answer in one short sentence."), ("user", "Why do bees dance?"))
    ids = AutoTokenizer.from_pretrained(str(default_model)).apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    by_chat = generate(stub, worker, chat=chat(*turns), temperature=0.0, max_tokens=40)
    by_hand = generate(stub, worker, token_ids=pb.TokenInput(ids=ids), temperature=0.0, max_tokens=40)
    assert by_chat.final.prompt_tokens == len(ids) == by_hand.final.prompt_tokens
    assert by_chat.ids() == by_hand.ids() and by_chat.text() == by_hand.text()
    # An answer that ends with end-of-sequence (made the greedy choice: a free
    # answer may run past any small max_tokens) reports it as the matched stop token.
    ended = generate(stub, worker, chat=chat(*turns), temperature=0.0, max_tokens=40, logit_bias={EOS: 100.0})
    assert ended.final.reason == pb.FINISH_REASON_STOP, ended.text()
    assert ended.final.WhichOneof("matched_stop") == "stop_token_id" and ended.final.stop_token_id == EOS
    assert ended.ids() == [EOS] and ended.final.completions[0].stop_token_id == EOS


def test_two_completions_are_indexed(stub, worker):
    r = generate(stub, worker, n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    for c in (0, 1):
        index = 0
        for d in (d for d in r.deltas if d.completion == c):
            assert d.index == index
            index += len(d.token_ids)
        assert index == 10
    assert [(e.completion, e.tokens, e.reason) for e in r.final.completions] == [
        (0, 10, pb.FINISH_REASON_LENGTH), (1, 10, pb.FINISH_REASON_LENGTH)
    ]
    assert r.final.tokens_generated == 20
    assert r.deltas[-1].completion_tokens == 20


def test_penalties_change_a_repetitive_answer(stub, worker):
    prompt = "Repeat after me, many times: bee bee bee bee bee bee bee bee"
    plain = generate(stub, worker, prompt=prompt, temperature=0.0, max_tokens=30, ignore_eos=True)
    penalised = generate(stub, worker, prompt=prompt, temperature=0.0, max_tokens=30, ignore_eos=True,
                         repetition_penalty=1.8, frequency_penalty=1.5)
    assert plain.ids() != penalised.ids()
    # The penalty is for repeating: fewer repeated tokens.
    assert len(set(penalised.ids())) > len(set(plain.ids()))


def test_running_counts_timings_and_load(stub, worker):
    r = generate(stub, worker, temperature=0.0, max_tokens=16, ignore_eos=True)
    counts = [d.completion_tokens for d in r.deltas]
    assert counts == sorted(counts) and counts[-1] == 16 == r.final.tokens_generated
    assert all(d.prompt_tokens == r.final.prompt_tokens for d in r.deltas)
    f = r.final
    assert f.reason == pb.FINISH_REASON_LENGTH and 0 < f.time_to_first_token_ms <= f.duration_ms
    assert f.queue_time_ms <= f.time_to_first_token_ms
    load = stub.GetLoad(pb.GetLoadRequest(), metadata=worker.metadata, timeout=10)
    assert load.state == common_pb2.WORKER_STATE_IDLE
    assert load.load.slots_total == SLOTS and load.load.slots_busy == 0
    assert load.load.generation_tokens_per_s > 0 and 0.0 <= load.load.kv_cache_usage <= 1.0


def test_cancel_with_a_reason(stub, worker):
    call = stub.Generate(pb.GenerateRequest(request_id="contract-cancel", prompt="Tell a long story.", max_tokens=1500,
                                            ignore_eos=True), metadata=worker.metadata, timeout=300)
    first = next(call)
    assert first.HasField("delta")
    reply = stub.Cancel(pb.CancelRequest(request_ids=["contract-cancel", "never-seen"], reason="test is done"),
                        metadata=worker.metadata, timeout=10)
    assert list(reply.cancelled_ids) == ["contract-cancel"]
    final = [m for m in call][-1].final
    assert final.reason == pb.FINISH_REASON_ABORT and final.abort_reason == "test is done"
    assert final.tokens_generated < 1500


@pytest.mark.parametrize(
    ("fields", "field"),
    [(dict(regex="("), "regex"), (dict(grammar="this is not a grammar"), "grammar")],
)
def test_constraints_the_engine_cannot_compile_are_invalid_arguments(stub, worker, fields, field):
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, worker, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()


def test_regex_constrains_the_output(stub, worker):
    r = generate(stub, worker, prompt="Pick a number.", regex="[0-9]{3}", temperature=0.0, max_tokens=10)
    assert len(r.text()) == 3 and r.text().isdigit()


def test_logit_bias_bans_the_greedy_token(stub, worker):
    free = generate(stub, worker, temperature=0.0, max_tokens=4, ignore_eos=True)
    first = free.ids()[0]
    banned = generate(stub, worker, temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={first: -100.0})
    assert banned.ids()[0] != first and first not in banned.ids()


def test_stop_string_kept_when_asked_and_special_tokens_shown(stub, worker):
    free = generate(stub, worker, temperature=0.0, max_tokens=30, ignore_eos=True)
    text = free.text()
    stop = text[len(text) // 2:len(text) // 2 + 3]
    kept = generate(stub, worker, temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop],
                    include_stop_str_in_output=True)
    assert kept.text() == text[: text.index(stop) + len(stop)] and kept.final.stop_string == stop
    # A special token's text shows only with skip_special_tokens off (end-of-sequence
    # made the greedy choice and generated past with ignore_eos) ...
    question = chat(("user", "Say yes."))
    forced = dict(chat=question, temperature=0.0, max_tokens=1, logit_bias={EOS: 100.0}, ignore_eos=True)
    hidden = generate(stub, worker, **forced)
    shown = generate(stub, worker, **forced, skip_special_tokens=False)
    assert hidden.ids() == shown.ids() == [EOS]
    assert hidden.final.reason == pb.FINISH_REASON_LENGTH == shown.final.reason
    assert shown.text() == "<|im_end|>" and hidden.text() == ""
    # ... while the end-of-sequence that ends an answer is no part of its text either way.
    ended = generate(stub, worker, chat=question, temperature=0.0, max_tokens=40, logit_bias={EOS: 100.0},
                     skip_special_tokens=False)
    assert ended.final.reason == pb.FINISH_REASON_STOP and ended.ids() == [EOS] and ended.text() == ""
