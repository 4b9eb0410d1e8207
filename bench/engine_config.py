"""The engine settings the worker chooses vs every setting it could choose.

On the machine it runs on, the default model in a matrix of dtype ×
thread setting, each cell a real llm-worker-rbee started with ``--dtype``
and ``VLLM_CPU_OMP_THREADS_BIND``:

- dtype: float32, bfloat16;
- threads: ``all`` (one OpenMP thread per core the worker may use, bound to
  them) and ``auto`` (vLLM's own binding, which keeps one core for its
  scheduler process when there are several: the worker does the same within
  its affinity and cgroup quota);

then the worker with no flags at all (its own choice). Every cell is loaded
at once; each round measures every cell in turn (a new order each round,
the other workers frozen with SIGSTOP so an idle engine's polling taxes
none): time to first token and tokens/s of one greedy stream, and the
tokens/s of 32 concurrent streams in all. Medians over the rounds with
bootstrap 95 % intervals; the goal: the worker's own choice within 5 % of
the best cell for time to first token and for 32-concurrent throughput.

Run: .venv/bin/python -m bench engine_config  (or -m bench.engine_config --rounds 3)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.contract import bootstrap_median
from bench.engine import Run, WorkerProcess, frozen
from rbee.config import default_model_path
from rbee.cpus import cpu_budget, format_cpu_list
from rbee.v1 import inference_pb2

DTYPES = ("float32", "bfloat16")
THREADS = ("all", "auto")


@dataclass
class Cell:
    name: str
    dtype: str | None  # None: the worker's own choice
    threads: str | None
    worker: WorkerProcess | None = None
    chosen: str = ""
    ttft_ms: list[float] = field(default_factory=list)
    one_tps: list[float] = field(default_factory=list)
    many_tps: list[float] = field(default_factory=list)


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """os.environ with ``values`` set (None: removed) while a worker is spawned."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cells(dtypes: tuple[str, ...] = DTYPES, threads: tuple[str, ...] = THREADS) -> list[Cell]:
    out = [Cell(f"{d} × threads {t}", d, t) for d in dtypes for t in threads]
    out.append(Cell("worker's own choice (no flags)", None, None))
    return out


async def start(cell: Cell, model: Path, slots: int, max_model_len: int) -> None:
    args = ["--max-model-len", str(max_model_len)]
    if cell.dtype:
        args += ["--dtype", cell.dtype]
    bind = {"all": format_cpu_list(cpu_budget().cores), "auto": "auto"}.get(cell.threads or "")
    with environment(VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CPU_KVCACHE_SPACE=None):
        cell.worker = WorkerProcess(model, slots=slots, args=args)
    started = time.perf_counter()
    await cell.worker.wait_loaded()
    info = await cell.worker.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), metadata=cell.worker.md)
    cell.chosen = f"{info.dtype} ({info.dtype_reason}); {info.cpu_threads} thread(s) on {info.cpu_set}"
    print(f"[bench] {cell.name}: loaded in {time.perf_counter() - started:.0f} s — {cell.chosen}", file=sys.stderr)


def tree(worker: WorkerProcess) -> list[psutil.Process]:
    leader = psutil.Process(worker.proc.pid)
    return [leader, *leader.children(recursive=True)]


async def measure(cell: Cell, others: list[psutil.Process], max_tokens: int, concurrency: int) -> None:
    worker = cell.worker
    assert worker is not None
    with frozen(others):
        one: Run = await worker.stream(max_tokens)
        start = time.perf_counter()
        many = await asyncio.gather(*(worker.stream(max_tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    cell.ttft_ms.append(one.ttft_s * 1000)
    cell.one_tps.append(one.tokens_per_s)
    cell.many_tps.append(sum(r.tokens for r in many) / wall)


async def main_async(args: argparse.Namespace) -> dict:
    model = Path(args.model)
    matrix = cells(tuple(args.dtypes.split(",")), tuple(args.threads.split(",")))
    rng = random.Random(args.seed)
    print(f"[bench] {len(matrix)} workers of {model.name} ({args.slots} slots each), on "
          f"{cpu_budget().describe()}; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)  # fmt: skip
    try:
        for i, cell in enumerate(matrix):
            # Loading one while the others idle-poll: freeze those already loaded.
            with frozen([p for c in matrix[:i] if c.worker for p in tree(c.worker)]):
                await start(cell, model, args.slots, args.max_model_len)
        for cell in matrix:  # warm every cell once
            with frozen([p for c in matrix if c is not cell and c.worker for p in tree(c.worker)]):
                await cell.worker.stream(8)
        for r in range(args.rounds):
            order = matrix[:]
            rng.shuffle(order)
            for cell in order:
                others = [p for c in matrix if c is not cell and c.worker for p in tree(c.worker)]
                await measure(cell, others, args.max_tokens, args.concurrency)
            print(f"[bench] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{c.name.split(' (')[0]} {c.ttft_ms[-1]:.0f} ms / {c.many_tps[-1]:.0f} tok/s" for c in matrix
            ), file=sys.stderr)  # fmt: skip
    finally:
        for cell in matrix:
            if cell.worker is not None:
                await cell.worker.close()
    return summarise(matrix, rng, args)


def summarise(matrix: list[Cell], rng: random.Random, args: argparse.Namespace) -> dict:
    rows = []
    for c in matrix:
        row = {"cell": c.name, "chosen": c.chosen}
        for key, values in (("ttft_ms", c.ttft_ms), ("one_stream_tps", c.one_tps), ("concurrent_tps", c.many_tps)):
            row[key] = bootstrap_median(values, rng) if len(values) > 1 else (values[0],) * 3
        rows.append(row)
    own, grid = rows[-1], rows[:-1]
    best_ttft = min(r["ttft_ms"][0] for r in grid)
    best_many = max(r["concurrent_tps"][0] for r in grid)
    return {
        "rows": rows,
        "rounds": args.rounds,
        "ttft_vs_best": own["ttft_ms"][0] / best_ttft,
        "concurrent_vs_best": own["concurrent_tps"][0] / best_many,
        "load_average": os.getloadavg()[0],
    }


def report(result: dict) -> None:
    print(f"median over {result['rounds']} rounds [bootstrap 95 % interval]; load average at the end {result['load_average']:.1f}")
    print(f"{'cell':34} {'TTFT ms':>24} {'1 stream tok/s':>22} {'32 streams tok/s':>24}")
    for r in result["rows"]:
        t, o, m = r["ttft_ms"], r["one_stream_tps"], r["concurrent_tps"]
        print(f"{r['cell']:34} {t[0]:8.0f} [{t[1]:6.0f}, {t[2]:6.0f}] {o[0]:6.1f} [{o[1]:5.1f}, {o[2]:5.1f}] "
              f"{m[0]:7.1f} [{m[1]:6.1f}, {m[2]:6.1f}]")  # fmt: skip
    print(f"worker's own choice: {result['rows'][-1]['chosen']}")
    print(f"  TTFT {result['ttft_vs_best']:.2f}× the best cell's (goal ≤ 1.05), "
          f"32-stream throughput {result['concurrent_vs_best']:.2f}× the best (goal ≥ 0.95)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024, help="keeps five KV caches in RAM at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="a part of the matrix: e.g. float32")
    parser.add_argument("--threads", default=",".join(THREADS), help="a part of the matrix: all, auto or both")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = asyncio.run(main_async(args))
    report(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
