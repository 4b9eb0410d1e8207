"""Soak: 64 concurrent streams against one CPU worker with fewer slots, for a
while (the soak benchmark of docs/security.md). Every stream client loops: Generate, and on
ALL_SLOTS_BUSY back off (0.25 s doubling to 2 s, jittered) and try again
(busy retries are the point: the worker has fewer slots than clients). Counted: streams started, finished,
failed by code, busy retries, hung (no message for --stall seconds: must be
0), and the worker's memory (RSS of the worker and its engine processes) at
the start and the end.

Run: .venv/bin/python -m bench.soak [--minutes 10] [--streams 64] [--slots 8]
(`make bench` runs it for 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
import psutil

from bench.engine import WorkerProcess
from rbee.config import default_model_path
from rbee.errors import from_rpc_error
from rbee.v1 import inference_pb2

PROMPTS = [
    "Write a haiku about bees.",
    "What is the capital of France?",
    "List three colours.",
    "Tell me a fact about honey.",
]


@dataclass
class Tally:
    started: int = 0
    finished: int = 0
    busy_retries: int = 0
    hung: int = 0
    tokens: int = 0
    failed: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and everything it started, in bytes."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


async def client(worker: WorkerProcess, tally: Tally, until: float, stall_s: float, max_tokens: int) -> None:
    """One stream after another until ``until``; busy → retry after a jittered, growing pause."""
    rng = random.Random()
    busy_in_a_row = 0
    while time.monotonic() < until:
        request = inference_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt=rng.choice(PROMPTS), max_tokens=max_tokens, temperature=0.7
        )
        call = worker.stub.Generate(request, metadata=worker.md)
        tally.started += 1
        began = time.monotonic()
        try:
            iterator = call.__aiter__()
            while True:
                try:
                    msg = await asyncio.wait_for(iterator.__anext__(), stall_s)
                except StopAsyncIteration:
                    break
                if msg.HasField("delta"):
                    tally.tokens += len(msg.delta.token_ids)
            tally.finished += 1
            tally.latencies.append(time.monotonic() - began)
            busy_in_a_row = 0
        except TimeoutError:
            tally.hung += 1
            call.cancel()
        except grpc.RpcError as exc:
            err = from_rpc_error(exc, worker.address)
            if err.code == "ALL_SLOTS_BUSY":
                tally.started -= 1  # refused at once: a retry, not a stream
                tally.busy_retries += 1
                # Backing off like a client should (the keeper waits 1, 2, 4 s):
                # 64 clients hammering 8 slots would starve the engine of CPU.
                busy_in_a_row += 1
                await asyncio.sleep(min(2.0, 0.25 * 2 ** (busy_in_a_row - 1)) * rng.uniform(0.5, 1.5))
            else:
                tally.failed[err.code] += 1


async def soak(seconds: float, streams: int, slots: int, max_tokens: int, stall_s: float) -> Tally:
    model = default_model_path()
    if not (model / "config.json").is_file():
        raise SystemExit(f"default model missing at {model}: run `make model`")
    worker = WorkerProcess(model, slots)
    try:
        print(f"loading {model.name} in a CPU worker ({slots} slots); log {worker.log_path}", flush=True)
        await worker.wait_loaded()
        rss_start = tree_rss(worker.proc.pid)
        print(f"{streams} streams for {seconds:.0f} s, max_tokens {max_tokens}", flush=True)
        tally = Tally()
        began = time.monotonic()
        await asyncio.gather(*(client(worker, tally, began + seconds, stall_s, max_tokens) for _ in range(streams)))
        elapsed = time.monotonic() - began
        rss_end = tree_rss(worker.proc.pid)
        alive = worker.proc.poll() is None
        report(tally, elapsed, streams, slots, rss_start, rss_end, alive)
        return tally
    finally:
        await worker.close()


def report(t: Tally, elapsed: float, streams: int, slots: int, rss_start: int, rss_end: int, alive: bool) -> None:
    mb = 1024 * 1024
    lat = sorted(t.latencies)
    p50 = lat[len(lat) // 2] if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
    failed = ", ".join(f"{code} {n}" for code, n in t.failed.most_common()) or "none"
    rows = [
        ("duration", f"{elapsed:.0f} s ({streams} clients, {slots} slots)"),
        ("streams started", str(t.started)),
        ("streams finished", str(t.finished)),
        ("failed by code", failed),
        ("busy retries", str(t.busy_retries)),
        ("hung (must be 0)", str(t.hung)),
        ("tokens", f"{t.tokens} ({t.tokens / elapsed:.1f}/s)"),
        ("stream time p50 / p99", f"{p50:.2f} s / {p99:.2f} s"),
        ("worker RSS start → end", f"{rss_start / mb:.0f} MB → {rss_end / mb:.0f} MB ({(rss_end - rss_start) / mb:+.0f} MB)"),
        ("worker alive at the end", "yes" if alive else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.0, help="how long (default 1; the issue's figure is 10)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--slots", type=int, default=8, help="the worker's slots, fewer than --streams")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stall", type=float, default=60.0, help="seconds without a message that make a stream hung")
    args = p.parse_args(argv)
    tally = asyncio.run(soak(args.minutes * 60, args.streams, args.slots, args.max_tokens, args.stall))
    return 1 if tally.hung or not tally.finished else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
