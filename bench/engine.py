"""Worker vs in-process vLLM, measured side by side in one run.

(a) One greedy stream: time to first token and tokens/s through the gRPC
    worker vs AsyncLLM called in-process with the same engine arguments;
    the two are interleaved run by run so machine noise hits both alike.
(c) Aggregate tokens/s of 16 concurrent streams vs 1, through the worker.

Run: .venv/bin/python -m bench.engine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from rbee.auth import auth_metadata, new_api_key
from rbee.channel import open_channel
from rbee.config import default_model_path
from rbee.tls import TlsIdentity
from rbee.v1 import inference_pb2, inference_pb2_grpc
from rbee_worker.engine import SamplingOptions
from rbee_worker.vllm_engine import VllmEngine
from tests.fixtures.ports import free_port

PROMPT = "Write a short story about a bee who learns to fly at night."


@dataclass
class Run:
    ttft_s: float
    tokens: int
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


class WorkerProcess:
    """A real llm-worker-rbee on 127.0.0.1; ``args`` are more flags for it, and
    ``tls`` the client identity its channel presents when it serves mutual TLS."""

    def __init__(self, model: Path, slots: int, args: Sequence[str] = (), tls: TlsIdentity | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.api_key = new_api_key()
        env = dict(os.environ, RBEE_WORKER_API_KEY=self.api_key, PYTHONUNBUFFERED="1")
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rbee-bench-worker-{self.port}.log"
        self._log = self.log_path.open("w")
        exe = Path(sys.executable).with_name("llm-worker-rbee")
        self.proc = subprocess.Popen(
            [str(exe), "--model", str(model), "--backend", "cpu", "--device", "0",
             "--port", str(self.port), "--slots", str(slots), *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.tls = tls
        self.channel = open_channel(self.address, tls)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.md = auth_metadata(self.api_key)

    async def wait_loaded(self) -> None:
        """Follow the loading stream (it ends once the model is loaded); fail if the process exits."""

        async def follow() -> None:
            req = inference_pb2.StreamLoadingProgressRequest()
            async for _ in self.stub.StreamLoadingProgress(req, metadata=self.md, wait_for_ready=True):
                pass

        exited = asyncio.create_task(asyncio.to_thread(self.proc.wait))
        loaded = asyncio.create_task(follow())
        await asyncio.wait({exited, loaded}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            loaded.cancel()
            raise SystemExit(f"worker exited with {self.proc.returncode}; log: {self.log_path}")
        await loaded  # raises if loading failed
        ready = await self.stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=self.md)
        if not ready.model_loaded:
            raise SystemExit(f"worker finished loading without a model; log: {self.log_path}")

    async def stream(self, max_tokens: int) -> Run:
        req = inference_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        )
        start = time.perf_counter()
        first = None
        tokens = 0
        async for msg in self.stub.Generate(req, metadata=self.md):
            if msg.HasField("delta"):
                if first is None:
                    first = time.perf_counter()
                tokens += len(msg.delta.token_ids)
        end = time.perf_counter()
        return Run((first or end) - start, tokens, end - start)

    async def close(self) -> None:
        try:
            await self.stub.Shutdown(inference_pb2.ShutdownRequest(drain_timeout_ms=5000), metadata=self.md, timeout=5)
            await asyncio.to_thread(self.proc.wait, 60)
        except Exception:  # noqa: BLE001 - fall through to the kill
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        await self.channel.close()
        self._log.close()


async def inprocess_stream(engine: VllmEngine, ids: list[int], max_tokens: int) -> Run:
    """AsyncLLM directly: the engine the worker wraps, with nothing around it."""
    # The same SamplingParams the worker builds for this request.
    params = engine.sampling_params(SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    first = None
    tokens = 0
    async for out in engine._llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
        if out.outputs[0].token_ids and first is None:
            first = time.perf_counter()
        tokens += len(out.outputs[0].token_ids)
    end = time.perf_counter()
    return Run((first or end) - start, tokens, end - start)


@contextlib.contextmanager
def frozen(procs: list[psutil.Process]) -> Iterator[None]:
    """Stop ``procs`` for the duration (SIGSTOP), then let them go on."""
    for proc in procs:
        proc.suspend()
    try:
        yield
    finally:
        for proc in procs:
            proc.resume()


def _median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


async def main_async(args: argparse.Namespace) -> dict:
    model = Path(args.model)
    print(f"[bench] starting worker (slots {args.concurrency}) and in-process engine on {model.name}", file=sys.stderr)
    worker = WorkerProcess(model, slots=args.concurrency)
    engine = VllmEngine(str(model), max_num_seqs=args.concurrency)
    try:
        await engine.load(lambda p: None)
        await worker.wait_loaded()
        ids = engine.encode(PROMPT, raw_prompt=False)
        # warm both paths once
        await inprocess_stream(engine, ids, 8)
        await worker.stream(8)
        local, remote = [], []
        # An idle vLLM engine on CPU still polls; with two loaded on two cores
        # the idle one would tax whichever is measured. Each side is therefore
        # frozen (SIGSTOP) while the other runs.
        worker_procs = [psutil.Process(worker.proc.pid), *psutil.Process(worker.proc.pid).children(recursive=True)]
        engine_procs = [p for p in psutil.Process().children(recursive=True) if p not in worker_procs]
        for i in range(args.runs):
            with frozen(worker_procs):
                local.append(await inprocess_stream(engine, ids, args.max_tokens))
            with frozen(engine_procs):
                remote.append(await worker.stream(args.max_tokens))
            print(f"[bench] run {i + 1}/{args.runs}: in-process {local[-1].tokens_per_s:.1f} tok/s, "
                  f"grpc {remote[-1].tokens_per_s:.1f} tok/s", file=sys.stderr)
        await engine.shutdown()

        # (c) through the worker alone: the in-process engine is gone now.
        one = [await worker.stream(args.max_tokens) for _ in range(2)]
        single_rate = max(r.tokens_per_s for r in one)
        start = time.perf_counter()
        many = await asyncio.gather(*(worker.stream(args.max_tokens) for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        aggregate = sum(r.tokens for r in many) / wall
    finally:
        await engine.shutdown()
        await worker.close()

    result = {
        "inprocess_ttft_ms": _median(local, "ttft_s") * 1000,
        "grpc_ttft_ms": _median(remote, "ttft_s") * 1000,
        "inprocess_tokens_per_s": _median(local, "tokens_per_s"),
        "grpc_tokens_per_s": _median(remote, "tokens_per_s"),
        "single_stream_tokens_per_s": single_rate,
        "concurrent_streams": args.concurrency,
        "concurrent_aggregate_tokens_per_s": aggregate,
    }
    result["throughput_ratio"] = result["grpc_tokens_per_s"] / result["inprocess_tokens_per_s"]
    result["added_ttft_ms"] = result["grpc_ttft_ms"] - result["inprocess_ttft_ms"]
    result["concurrency_ratio"] = aggregate / single_rate
    return result


def report(result: dict) -> None:
    print(f"(a) one greedy stream, {result.get('max_tokens', '')} tokens, median of runs")
    print(f"    in-process AsyncLLM : TTFT {result['inprocess_ttft_ms']:.1f} ms, {result['inprocess_tokens_per_s']:.1f} tok/s")
    print(f"    through gRPC worker : TTFT {result['grpc_ttft_ms']:.1f} ms, {result['grpc_tokens_per_s']:.1f} tok/s")
    print(f"    throughput ratio {result['throughput_ratio']:.3f} (goal ≥ 0.95), added TTFT {result['added_ttft_ms']:.1f} ms (goal ≤ 20)")
    print(f"(c) {result['concurrent_streams']} concurrent streams: {result['concurrent_aggregate_tokens_per_s']:.1f} tok/s aggregate "
          f"vs {result['single_stream_tokens_per_s']:.1f} single → {result['concurrency_ratio']:.2f}× (goal ≥ 4×)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = asyncio.run(main_async(args))
    result["max_tokens"] = args.max_tokens
    report(result)
    return result


if __name__ == "__main__":
    main()
