"""The inference contract's costs: worker vs in-process vLLM with the same
SamplingParams, in the same run.

(1) one stream with logprobs (top 5 per token): time to first token, tokens/s;
(2) one stream constrained to a JSON schema: time to first token, tokens/s;
(3) aggregate tokens/s of 32 concurrent streams.

Each scenario runs in rounds that alternate the two sides (each side frozen
with SIGSTOP while the other runs, as in bench.engine); per round the ratio
worker / in-process is taken, and the report gives the median ratio with a
bootstrap 95 % interval over the rounds and whether it contains 1. Single
runs on a 2-core machine swing by ±30 %, which is why one pair says little.

Run: .venv/bin/python -m bench.contract [--rounds 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from bench.engine import Run, WorkerProcess, frozen
from rbee.config import default_model_path
from rbee.v1 import inference_pb2 as pb
from rbee_worker.engine import Constraint, SamplingOptions
from rbee_worker.vllm_engine import VllmEngine

CONCURRENCY = 32
MESSAGES = ({"role": "user", "content": "Describe a honey bee in a few sentences."},)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}, "colours": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "legs", "colours"],
}


@dataclass(frozen=True)
class Scenario:
    name: str
    options: SamplingOptions
    streams: int = 1
    # A short raw prompt instead of the chat: with 32 streams the prompts'
    # prefill would otherwise dominate what is meant to measure generation.
    raw_prompt: str | None = None


def scenarios(max_tokens: int, concurrent_tokens: int) -> list[Scenario]:
    greedy = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [
        Scenario("logprobs", replace(greedy, logprobs=5)),
        # No ignore_eos: the schema's grammar decides where the answer ends.
        Scenario("json_schema", replace(greedy, ignore_eos=False, constraint=Constraint("json_schema", json.dumps(SCHEMA)))),
        Scenario(f"concurrent_{CONCURRENCY}", replace(greedy, max_tokens=concurrent_tokens), streams=CONCURRENCY,
                 raw_prompt="Honey bees"),
    ]


def request_for(sc: Scenario) -> pb.GenerateRequest:
    """The wire request for a scenario: the fields the worker maps back onto the same SamplingParams."""
    options = sc.options
    req = pb.GenerateRequest(max_tokens=options.max_tokens, temperature=options.temperature, ignore_eos=options.ignore_eos)
    if sc.raw_prompt is not None:
        req.prompt, req.raw_prompt = sc.raw_prompt, True
    else:
        req.chat.messages.extend(pb.ChatMessage(**m) for m in MESSAGES)
    if options.logprobs is not None:
        req.logprobs = options.logprobs
    if options.constraint is not None:
        req.json_schema = options.constraint.value
    return req


async def worker_stream(worker: WorkerProcess, request: pb.GenerateRequest) -> Run:
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = uuid.uuid4().hex
    request = copy
    start = time.perf_counter()
    first = None
    tokens = 0
    async for msg in worker.stub.Generate(request, metadata=worker.md):
        if msg.HasField("delta") and msg.delta.token_ids:
            first = first or time.perf_counter()
            tokens += len(msg.delta.token_ids)
    end = time.perf_counter()
    return Run((first or end) - start, tokens, end - start)


async def inprocess_stream(engine: VllmEngine, ids: list[int], options: SamplingOptions) -> Run:
    params = engine.sampling_params(options)  # exactly what the worker builds for the same request
    start = time.perf_counter()
    first = None
    tokens = 0
    async for out in engine._llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
        n = sum(len(c.token_ids) for c in out.outputs)
        if n and first is None:
            first = time.perf_counter()
        tokens += n
    end = time.perf_counter()
    return Run((first or end) - start, tokens, end - start)


async def side(streams: int, one) -> Run:
    """One measurement: `streams` concurrent streams; aggregate tokens over the wall time."""
    start = time.perf_counter()
    runs = await asyncio.gather(*(one() for _ in range(streams)))
    wall = time.perf_counter() - start
    return Run(min(r.ttft_s for r in runs), sum(r.tokens for r in runs), wall)


def bootstrap_median(values: list[float], rng: random.Random, resamples: int = 4000) -> tuple[float, float, float]:
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def summarise(name: str, local: list[Run], remote: list[Run], rng: random.Random) -> dict:
    tps = [r.tokens_per_s / l.tokens_per_s for l, r in zip(local, remote, strict=True)]
    ttft = [r.ttft_s / l.ttft_s for l, r in zip(local, remote, strict=True)]
    added = [(r.ttft_s - l.ttft_s) * 1000 for l, r in zip(local, remote, strict=True)]
    out = {"scenario": name, "rounds": len(local)}
    for key, values in (("tokens_per_s_ratio", tps), ("ttft_ratio", ttft), ("added_ttft_ms", added)):
        median, low, high = bootstrap_median(values, rng)
        out[key] = {"median": median, "ci95": [low, high]}
    out["inprocess"] = {"ttft_ms": statistics.median(l.ttft_s for l in local) * 1000,
                        "tokens_per_s": statistics.median(l.tokens_per_s for l in local)}
    out["worker"] = {"ttft_ms": statistics.median(r.ttft_s for r in remote) * 1000,
                     "tokens_per_s": statistics.median(r.tokens_per_s for r in remote)}
    out["tokens_per_round"] = {"inprocess": local[0].tokens, "worker": remote[0].tokens}
    return out


async def main_async(args: argparse.Namespace) -> list[dict]:
    model = Path(args.model)
    print(f"[bench] starting worker (slots {CONCURRENCY}) and in-process engine on {model.name}", file=sys.stderr)
    worker = WorkerProcess(model, slots=CONCURRENCY)
    engine = VllmEngine(str(model), max_num_seqs=CONCURRENCY)
    rng = random.Random(args.seed)
    results = []
    try:
        await engine.load(lambda p: None)
        await worker.wait_loaded()
        chat_ids = engine.encode_chat(MESSAGES)
        worker_procs = [psutil.Process(worker.proc.pid), *psutil.Process(worker.proc.pid).children(recursive=True)]
        engine_procs = [p for p in psutil.Process().children(recursive=True) if p not in worker_procs]
        chosen = [sc for sc in scenarios(args.max_tokens, args.concurrent_tokens)
                  if not args.only or sc.name in args.only.split(",")]
        for sc in chosen:
            request = request_for(sc)
            ids = engine.encode(sc.raw_prompt, raw_prompt=True) if sc.raw_prompt is not None else chat_ids

            def local_one(sc=sc, ids=ids):
                return inprocess_stream(engine, ids, sc.options)

            def remote_one(request=request):
                return worker_stream(worker, request)

            # Warm both paths (the schema's grammar is compiled and cached here).
            with frozen(worker_procs):
                await side(sc.streams, local_one)
            with frozen(engine_procs):
                await side(sc.streams, remote_one)
            local, remote = [], []
            for i in range(args.rounds):
                # Alternate which side goes first, so drift hits both alike.
                order = [("local", engine_procs, worker_procs), ("remote", worker_procs, engine_procs)]
                if i % 2:
                    order.reverse()
                for which, _, other in order:
                    with frozen(other):
                        if which == "local":
                            local.append(await side(sc.streams, local_one))
                        else:
                            remote.append(await side(sc.streams, remote_one))
            summary = summarise(sc.name, local, remote, rng)
            results.append(summary)
            print(f"[bench] {sc.name}: tokens/s ratio {summary['tokens_per_s_ratio']['median']:.3f}", file=sys.stderr)
    finally:
        await engine.shutdown()
        await worker.close()
    return results


def report(results: list[dict]) -> None:
    print("worker / in-process AsyncLLM, same SamplingParams; median over rounds, bootstrap 95 % interval")
    for r in results:
        tps, ttft, added = r["tokens_per_s_ratio"], r["ttft_ratio"], r["added_ttft_ms"]
        contains = "contains 1" if tps["ci95"][0] <= 1 <= tps["ci95"][1] else "excludes 1"
        print(f"  {r['scenario']:<14} {r['rounds']} rounds, {r['tokens_per_round']['worker']} tokens/round")
        print(f"    in-process: TTFT {r['inprocess']['ttft_ms']:.1f} ms, {r['inprocess']['tokens_per_s']:.1f} tok/s;"
              f" worker: TTFT {r['worker']['ttft_ms']:.1f} ms, {r['worker']['tokens_per_s']:.1f} tok/s")
        print(f"    tokens/s ratio {tps['median']:.3f} [{tps['ci95'][0]:.3f}, {tps['ci95'][1]:.3f}] ({contains}; aim ≥ 0.97)")
        print(f"    TTFT ratio {ttft['median']:.3f} [{ttft['ci95'][0]:.3f}, {ttft['ci95'][1]:.3f}],"
              f" added TTFT {added['median']:.1f} ms [{added['ci95'][0]:.1f}, {added['ci95'][1]:.1f}]")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds per scenario (default 30)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per single stream (default 16)")
    parser.add_argument("--concurrent-tokens", type=int, default=8, help=f"tokens per stream of the {CONCURRENCY} (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--only", metavar="NAMES", default="", help="comma-separated scenarios: logprobs, json_schema, concurrent_32")
    args = parser.parse_args(argv)
    if args.rounds < 30:
        print(f"[bench] note: {args.rounds} rounds; the interval is meant for 30 or more", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    started = time.monotonic()
    results = asyncio.run(main_async(args))
    report(results)
    print(f"(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
