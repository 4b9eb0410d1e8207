"""The queen's OpenAI-compatible front door against vLLM's own OpenAI server,
with the same `openai` client, on the same model and machine.

Engine rounds: a queen (HTTP port on) with this machine as node `bench` and a
warm worker of the default model (32 slots), and vLLM's server
(`python -m vllm.entrypoints.openai.api_server`) on the same model with the
same dtype, context, 32 sequences and the same CPU cores; rounds alternate,
vLLM's server frozen (SIGSTOP) while the front door runs; the node's worker
stays idle, not frozen (its hive would take it for dead). Per round: one
streaming chat (TTFT, tokens/s) and 32 at once (aggregate tokens/s), greedy,
`ignore_eos`. Reported: added TTFT (ms, front door − vLLM) and the tokens/s
ratios (front door / vLLM), medians with bootstrap 95 % intervals.

The proxy's ceiling: the front door (its own process) over a worker whose
engine emits tokens as fast as it can (bench.transport's flood engine, its
own process): SSE chunks/s and tokens/s for 1 stream and 32, beside the same
streams straight over gRPC (the transport ceiling).

Run: .venv/bin/python -m bench.openai [--rounds 10] [--skip-engine] [--skip-ceiling]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil

from rbee.config import default_model_path

from bench.contract import bootstrap_median
from bench.engine import Run
from tests.fixtures.ports import free_port

BIN = Path(sys.executable).parent
PROMPT = "Write a short story about honey bees."
SLOTS = 32
ONE_TOKENS = 64
MANY_TOKENS = 32
CEILING_ONE = 20_000
CEILING_MANY = 2_000
KEY = "bench-openai-admin-key"


@contextlib.contextmanager
def frozen(procs: list[psutil.Process]) -> Iterator[None]:
    """SIGSTOP ``procs`` for the duration; a process that is gone meanwhile
    (an engine's short-lived helper) is skipped."""
    stopped = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.suspend()
            stopped.append(proc)
    try:
        yield
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.Error):
                proc.resume()


# -- the two sides ------------------------------------------------------------------------


class Side:
    name = ""
    base_url = ""
    model = ""
    proc: subprocess.Popen | None = None

    def engine_procs(self) -> list[psutil.Process]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class Queen(Side):
    name = "front door"

    def __init__(self, root: Path, model: Path, env: dict[str, str]) -> None:
        self.root, self.model_path = root, model
        self.port, self.http_port = free_port(), free_port()
        self.env = dict(env, RBEE_HOME=str(root / "queen"), RBEE_HIVE_MODEL_DIRS=str(model.parent),
                        RBEE_QUEEN_API_KEY=KEY, PYTHONUNBUFFERED="1")  # fmt: skip
        self.base_url = f"http://127.0.0.1:{self.http_port}/v1"
        self.model = f"file://{model}"

    def keeper(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "rbee-keeper"), *args, "--queen", f"127.0.0.1:{self.port}"], env=self.env,
                              capture_output=True, text=True)  # fmt: skip

    def start(self) -> None:
        self.serve()
        warm = self.keeper("infer", "--node", "bench", "--model", self.model, "--prompt", "hi", "--max-tokens", "1",
                           "--slots", str(SLOTS), "--loading-timeout", "1800")  # fmt: skip
        if warm.returncode:
            raise SystemExit(warm.stderr)
        listed = [json.loads(line) for line in self.keeper("workers", "list", "--json").stdout.splitlines()]
        # The slots the worker got (the hive may give fewer than asked).
        self.slots = max((w.get("slots_total", 0) for w in listed), default=0) or SLOTS

    def serve(self) -> None:
        """The queen running, with this machine as node `bench` (no worker yet)."""
        log = open(self.root / "queen.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([str(BIN / "queen-rbee"), "daemon", "--port", str(self.port), "--http-port", str(self.http_port)],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while self.keeper("setup", "list-nodes").returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"the queen did not start; log {self.root / 'queen.log'}")
            time.sleep(0.2)
        add = self.keeper("setup", "add-node", "--name", "bench", "--local", "--rbee-home", str(self.root / "node"),
                          "--hive-port", str(free_port()))  # fmt: skip
        if add.returncode:
            raise SystemExit(add.stderr)

    def engine_procs(self) -> list[psutil.Process]:
        """Nothing: the node's worker is left idle, not frozen. Its hive checks
        its health every few seconds and kills a worker that stops answering,
        and the queen's keepalive pings give up on it in seconds (an idle
        engine takes little CPU)."""
        return []


class Vllm(Side):
    name = "vLLM server"

    def __init__(self, root: Path, model: Path, env: dict[str, str], dtype: str, slots: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = "bench"
        self.log = root / "vllm-server.log"
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                     "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--max-model-len", "2048", "--max-num-seqs", str(slots), "--enforce-eager",
                     "--api-key", KEY, "--disable-log-stats"]  # fmt: skip
        self.env = dict(env)

    def start(self) -> None:
        import httpx

        log = open(self.log, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"vLLM's server exited with {self.proc.returncode}; log {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"vLLM's server did not answer; log {self.log}")

    def engine_procs(self) -> list[psutil.Process]:
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]


async def chat(client, model: str, max_tokens: int) -> Run:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Run((first or end) - start, tokens, end - start)


async def many(client, model: str, streams: int, max_tokens: int) -> Run:
    start = time.perf_counter()
    runs = await asyncio.gather(*(chat(client, model, max_tokens) for _ in range(streams)))
    return Run(min(r.ttft_s for r in runs), sum(r.tokens for r in runs), time.perf_counter() - start)


def interval(values: list[float], rng: random.Random) -> dict:
    median, low, high = bootstrap_median(values, rng)
    return {"median": median, "ci95": [low, high]}


async def bench_engine(args: argparse.Namespace, root: Path, rng: random.Random) -> dict:
    import openai

    from rbee_worker.engine_plan import machine_plan

    model = Path(args.model)
    plan = machine_plan(str(model), "cpu", 0, slots=SLOTS, max_model_len=2048)
    # Both engines: the same cores and a KV cache of the same size.
    env = dict(os.environ, **plan.env, VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib))
    queen = Queen(root, model, env)
    sides: list[Side] = [queen]
    try:
        print(f"[bench] starting the queen and a warm worker ({SLOTS} slots asked, dtype {plan.dtype.dtype})", file=sys.stderr)
        queen.start()
        streams = queen.slots
        vllm = Vllm(root, model, env, plan.dtype.dtype, streams)
        sides.append(vllm)
        print(f"[bench] the worker has {streams} slots: the many-stream rounds use {streams} streams on both sides", file=sys.stderr)
        with frozen(queen.engine_procs()):
            print("[bench] starting vLLM's OpenAI server on the same model", file=sys.stderr)
            vllm.start()
        clients = {s.name: openai.AsyncOpenAI(base_url=s.base_url, api_key=KEY, max_retries=0, timeout=600) for s in sides}
        results: dict[str, dict[str, list[Run]]] = {s.name: {"one": [], "many": []} for s in sides}
        for rnd in range(args.rounds + 1):  # round 0 warms both up and is not counted
            order = sides if rnd % 2 == 0 else sides[::-1]
            for side in order:
                idle = [s for s in sides if s is not side][0]
                with frozen(idle.engine_procs()):
                    one = await chat(clients[side.name], side.model, ONE_TOKENS)
                    both = await many(clients[side.name], side.model, streams, MANY_TOKENS)
                if rnd:
                    results[side.name]["one"].append(one)
                    results[side.name]["many"].append(both)
            if rnd:
                print(f"[bench] round {rnd}/{args.rounds}", file=sys.stderr)
        q, v = results[queen.name], results[vllm.name]
        return {
            "rounds": args.rounds, "streams": streams,
            "added_ttft_ms": interval([(a.ttft_s - b.ttft_s) * 1000 for a, b in zip(q["one"], v["one"])], rng),
            "tokens_per_s_ratio_1": interval([a.tokens_per_s / b.tokens_per_s for a, b in zip(q["one"], v["one"])], rng),
            "tokens_per_s_ratio_many": interval([a.tokens_per_s / b.tokens_per_s for a, b in zip(q["many"], v["many"])], rng),
            "front_door": {"ttft_ms": statistics.median(r.ttft_s for r in q["one"]) * 1000,
                           "tokens_per_s_1": statistics.median(r.tokens_per_s for r in q["one"]),
                           "tokens_per_s_many": statistics.median(r.tokens_per_s for r in q["many"])},
            "vllm_server": {"ttft_ms": statistics.median(r.ttft_s for r in v["one"]) * 1000,
                            "tokens_per_s_1": statistics.median(r.tokens_per_s for r in v["one"]),
                            "tokens_per_s_many": statistics.median(r.tokens_per_s for r in v["many"])},
        }  # fmt: skip
    finally:
        for side in sides:
            for p in side.engine_procs() if side.proc is not None else []:
                try:
                    p.resume()
                except psutil.Error:
                    pass
            side.stop()


# -- the proxy's ceiling --------------------------------------------------------------------


async def _serve_door(address: str) -> None:
    """The front door alone (its own process) over one worker at ``address``."""
    from rbee.narration import Narrator
    from rbee.v1 import common_pb2, registry_pb2
    from rbee_queen.http.asgi import create_app
    from rbee_queen.http.auth import Authenticator
    from rbee_queen.http.routing import Router, _Cached
    from rbee_queen.http.listener import HttpServer
    from rbee_queen.http.upstream import WorkerLease
    from rbee_queen.nodes.store import NodeStore
    from rbee_queen.workers import ClusterWorkers

    from bench.transport import KEY as WORKER_KEY, serve_until_stdin_closes

    registry = ClusterWorkers(3600)
    info = common_pb2.WorkerInfo(id="flood", address=address, model_ref="hf:bench/flood", state=common_pb2.WORKER_STATE_IDLE,
                                 slots_total=SLOTS, slots_available=SLOTS)  # fmt: skip
    registry.apply("bench", "-", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", workers=[info]))
    with tempfile.TemporaryDirectory() as tmp:
        router = Router(NodeStore(Path(tmp) / "beehives.db"), registry, None, Narrator("queen-rbee", stream=open(os.devnull, "w")), 1)
        router._access["flood"] = _Cached(WorkerLease("bench", "flood", address, WORKER_KEY, False, "hf:bench/flood"))
        server = HttpServer(create_app(Authenticator(KEY), router))
        await server.start("127.0.0.1", 0)

        # The shape serve_until_stdin_closes announces and stops.
        stopper = SimpleNamespace(stop=lambda _grace: server.stop())
        await serve_until_stdin_closes([SimpleNamespace(port=server.port, server=stopper)])


async def _serve_flood() -> None:
    from bench.transport import flood_server, serve_until_stdin_closes

    await serve_until_stdin_closes([await flood_server("bench-openai", slots=SLOTS)])


async def sse_stream(http, base_url: str, tokens: int) -> tuple[int, int, float]:
    """(data events, tokens, seconds) of one streamed completion, read raw."""
    body = {"model": "hf:bench/flood", "prompt": "bench", "max_tokens": tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = got = 0
    start = time.perf_counter()
    async with http.stream("POST", f"{base_url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"front door answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                events += 1
                if '"usage":{' in line:
                    got = json.loads(line[6:])["usage"]["completion_tokens"]
    return events, got, time.perf_counter() - start


async def bench_ceiling(runs: int) -> dict:
    import httpx

    from bench.transport import server_process, stream

    out: dict = {}
    with server_process("bench.openai", "flood") as [worker]:
        with server_process("bench.openai", "door", worker) as [door]:
            base = f"http://{door}/v1"
            for label, streams, tokens in (("1 stream", 1, CEILING_ONE), ("32 streams", SLOTS, CEILING_MANY)):
                http_runs, grpc_runs = [], []
                for _ in range(runs):
                    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
                        start = time.perf_counter()
                        got = await asyncio.gather(*(sse_stream(http, base, tokens) for _ in range(streams)))
                        wall = time.perf_counter() - start
                    http_runs.append((sum(g[0] for g in got) / wall, sum(g[1] for g in got) / wall))
                    start = time.perf_counter()
                    direct = await asyncio.gather(*(stream(worker, tokens) for _ in range(streams)))
                    wall = time.perf_counter() - start
                    grpc_runs.append((sum(d["messages"] for d in direct) / wall, sum(d["tokens"] for d in direct) / wall))
                out[label] = {
                    "front_door_chunks_per_s": statistics.median(r[0] for r in http_runs),
                    "front_door_tokens_per_s": statistics.median(r[1] for r in http_runs),
                    "grpc_messages_per_s": statistics.median(r[0] for r in grpc_runs),
                    "grpc_tokens_per_s": statistics.median(r[1] for r in grpc_runs),
                }
    return out


# -- report -------------------------------------------------------------------------------


def _ci(i: dict, fmt: str) -> str:
    return f"{fmt.format(i['median'])} [{fmt.format(i['ci95'][0])}, {fmt.format(i['ci95'][1])}]"


def report(result: dict) -> None:
    e = result.get("engine")
    if e:
        print(f"openai client, front door vs vLLM's OpenAI server, {e['rounds']} alternating rounds (median, bootstrap 95 % CI):")
        print(f"  added TTFT, 1 stream:        {_ci(e['added_ttft_ms'], '{:+.1f}')} ms   (goal ≤ 10 ms)")
        print(f"  tokens/s ratio, 1 stream:    {_ci(e['tokens_per_s_ratio_1'], '{:.3f}')}   (goal ≥ 0.95)")
        print(f"  tokens/s ratio, {e['streams']} streams:  {_ci(e['tokens_per_s_ratio_many'], '{:.3f}')}   (goal ≥ 0.95)")
        for name in ("front_door", "vllm_server"):
            s = e[name]
            print(f"  {name:12s} TTFT {s['ttft_ms']:.0f} ms · {s['tokens_per_s_1']:.1f} tok/s (1) · {s['tokens_per_s_many']:.1f} tok/s ({e['streams']})")
    c = result.get("ceiling")
    if c:
        print("the proxy's ceiling (flood engine; SSE through the front door vs gRPC straight to the worker):")
        for label, r in c.items():
            print(f"  {label:10s} front door {r['front_door_chunks_per_s']:,.0f} chunks/s, {r['front_door_tokens_per_s']:,.0f} tokens/s · "
                  f"gRPC {r['grpc_messages_per_s']:,.0f} messages/s, {r['grpc_tokens_per_s']:,.0f} tokens/s")  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.openai", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ceiling-runs", type=int, default=3)
    p.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for both engines (GiB)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-ceiling", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.serve:
        from bench.transport import serve

        if args.serve[0] == "flood":
            serve(True, _serve_flood)
        else:
            serve(True, lambda: _serve_door(args.serve[1]))
        return None
    rng = random.Random(args.seed)
    result: dict = {}
    if not args.skip_ceiling:
        result["ceiling"] = asyncio.run(bench_ceiling(args.ceiling_runs))
    if not args.skip_engine:
        tmp = tempfile.mkdtemp(prefix="rbee-bench-openai-")
        result["engine"] = asyncio.run(bench_engine(args, Path(tmp), rng))
        shutil.rmtree(tmp, ignore_errors=True)  # kept, with the daemons' logs, when the run fails
    report(result)
    return result


if __name__ == "__main__":
    main()
