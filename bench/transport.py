"""The worker's stream ceiling: how many tokens/s one Generate stream can carry.

The real InferenceServicer and grpc.aio server (with auth, as the worker runs
them, uvloop included) in a server process on 127.0.0.1, fed by a synthetic
engine that emits one token per event-loop turn, as fast as it can; a client
process reads the stream. Two servers side by side in the same run:

  coalesced   tokens that are ready together go out as one TokenDelta (the worker)
  per-token   one message per engine delta (the naive baseline)

Also: how long the worker takes to notice a client that went away while the
engine is stuck mid-step (from the client's cancel to the engine's abort).

Run: .venv/bin/python -m bench.transport [--tokens 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import grpc

from rbee.auth import auth_metadata
from rbee.narration import Narrator
from rbee.v1 import inference_pb2, inference_pb2_grpc
from rbee_worker.engine import Delta, Engine, EngineInfo, ProgressCallback, SamplingOptions

if TYPE_CHECKING:
    from rbee.tls import TlsIdentity

KEY = "bench-transport-key"
MODES = ("coalesced", "per-token")


class FloodEngine(Engine):
    """Emits max_tokens single-token deltas, yielding to the loop after each
    one (as a real engine's output handler does between steps)."""

    async def load(self, progress: ProgressCallback) -> EngineInfo:
        return EngineInfo(max_model_len=2**31, engine_version="flood")

    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        return [1, 2, 3]

    def encode_chat(self, messages) -> list[int]:
        return [1, 2, 3]

    async def generate(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        n = options.max_tokens
        for i in range(1, n + 1):
            yield Delta(token_ids=[i % 49152], text="x", finished=i == n, finish_reason="length" if i == n else None,
                        prompt_tokens=3)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        return None

    async def health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


class StuckEngine(FloodEngine):
    """Never produces a token: only a disconnect can end its requests."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.aborted = asyncio.Event()

    async def generate(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        self.started.set()
        await asyncio.Event().wait()
        yield Delta()  # pragma: no cover - never reached

    async def abort(self, request_id: str) -> None:
        self.aborted.set()


async def bench_disconnect(runs: int = 5) -> dict:
    """Milliseconds from a client's cancel to the engine's abort (median, max)."""
    from rbee_worker.grpc_server import create_server
    from rbee_worker.servicer import InferenceServicer
    from rbee_worker.status import Identity, WorkerStatus

    samples = []
    for _ in range(runs):
        engine = StuckEngine()
        status = WorkerStatus()
        identity = Identity("bench-disconnect", "stuck", "-", "cpu", 0, "127.0.0.1", 0, os.getpid())
        servicer = InferenceServicer(engine, status, identity, slots=1, narrator=Narrator("llm-worker-rbee", stream=io.StringIO()))
        status.loaded(await engine.load(lambda p: None))
        ws = await create_server(servicer, status, KEY)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as channel:
                call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                    inference_pb2.GenerateRequest(prompt="x", max_tokens=10), metadata=auth_metadata(KEY)
                )
                await engine.started.wait()
                start = time.perf_counter()
                call.cancel()
                await engine.aborted.wait()
                samples.append((time.perf_counter() - start) * 1000)
                if servicer.slots_busy:
                    raise AssertionError("slot not freed after disconnect")
        finally:
            await ws.server.stop(None)
    return {"runs": runs, "median_ms": statistics.median(samples), "max_ms": max(samples)}


# -- server process ------------------------------------------------------------------


async def flood_server(name: str, coalesce: bool = True, tls: "TlsIdentity | None" = None, slots: int = 4):
    """The real InferenceServicer and grpc.aio server (with auth) over a
    FloodEngine on 127.0.0.1, an ephemeral port; mutual TLS with ``tls``."""
    from rbee_worker.grpc_server import create_server
    from rbee_worker.servicer import InferenceServicer
    from rbee_worker.status import Identity, WorkerStatus

    engine = FloodEngine()
    status = WorkerStatus()
    identity = Identity(name, "flood", "-", "cpu", 0, "127.0.0.1", 0, os.getpid())
    servicer = InferenceServicer(
        engine, status, identity, slots=slots, narrator=Narrator("llm-worker-rbee", stream=io.StringIO()), coalesce=coalesce
    )
    status.loaded(await engine.load(lambda p: None))
    return await create_server(servicer, status, KEY, tls=tls)


async def serve_until_stdin_closes(servers: list) -> None:
    """Announce the servers' ports on stdout, serve until the parent closes our stdin."""
    print("PORTS " + " ".join(str(s.port) for s in servers), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for s in servers:
        await s.server.stop(None)


async def _serve() -> None:
    servers = [await flood_server(f"bench-{mode}", coalesce=mode == "coalesced") for mode in MODES]
    await serve_until_stdin_closes(servers)


def serve(use_uvloop: bool, main: Callable[[], Awaitable[None]] = _serve) -> None:
    loop_factory = None
    if use_uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


@contextlib.contextmanager
def server_process(module: str, *args: str) -> Iterator[list[str]]:
    """Run ``python -m module --serve *args`` (which serves until its stdin
    closes) and yield the addresses it announced."""
    cmd = [sys.executable, "-m", module, "--serve", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORTS "):
            raise RuntimeError(f"bench server did not start (got {line!r})")
        yield [f"127.0.0.1:{port}" for port in line.split()[1:]]
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- client ----------------------------------------------------------------------------


async def stream(address: str, tokens: int, tls: "TlsIdentity | None" = None) -> dict:
    """One Generate stream of ``tokens`` tokens on a channel of its own (mutual TLS with ``tls``)."""
    channel = grpc.aio.secure_channel(address, tls.channel_credentials()) if tls else grpc.aio.insecure_channel(address)
    async with channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(prompt="bench", max_tokens=tokens, ignore_eos=True)
        messages = received = 0
        expected_index = 0
        start = time.perf_counter()
        first = None
        final = None
        async for msg in stub.Generate(request, metadata=auth_metadata(KEY)):
            if msg.HasField("delta"):
                if first is None:
                    first = time.perf_counter()
                delta = msg.delta
                if delta.index != expected_index:
                    raise AssertionError(f"index {delta.index} where {expected_index} was expected")
                n = len(delta.token_ids)
                expected_index += n
                received += n
                messages += 1
            else:
                final = msg.final
        elapsed = time.perf_counter() - start
    if final is None or final.tokens_generated != tokens or received != tokens:
        raise AssertionError(f"stream incomplete: {received}/{tokens} tokens, final={final}")
    return {
        "seconds": elapsed,
        "tokens": received,
        "messages": messages,
        "tokens_per_s": received / elapsed,
        "messages_per_s": messages / elapsed,
        "tokens_per_message": received / messages,
        "ttft_ms": ((first or start) - start) * 1000,
    }


async def bench_transport(tokens: int = 100_000, runs: int = 3, use_uvloop: bool = True) -> dict:
    """Median figures per mode over ``runs`` streams of ``tokens`` tokens each,
    the modes interleaved run by run so machine noise hits both alike."""
    with server_process("bench.transport", *([] if use_uvloop else ["--no-uvloop"])) as listed:
        addresses = dict(zip(MODES, listed))
        for mode in MODES:  # warm up connections and code paths
            await stream(addresses[mode], 2_000)
        samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(runs):
            for mode in MODES:
                samples[mode].append(await stream(addresses[mode], tokens))
    result: dict = {"tokens_per_stream": tokens, "runs": runs, "server_loop": "uvloop" if use_uvloop else "asyncio"}
    for mode in MODES:
        result[mode] = {
            key: statistics.median(s[key] for s in samples[mode])
            for key in ("tokens_per_s", "messages_per_s", "tokens_per_message", "seconds", "ttft_ms")
        }
        result[mode]["messages"] = int(statistics.median(s["messages"] for s in samples[mode]))
    result["speedup"] = result["coalesced"]["tokens_per_s"] / result["per-token"]["tokens_per_s"]
    result["disconnect"] = await bench_disconnect()
    return result


def report(result: dict) -> None:
    print(
        f"one stream of {result['tokens_per_stream']:,} tokens, median of {result['runs']} runs "
        f"(server loop: {result['server_loop']})"
    )
    print(f"{'mode':<11} {'tokens/s':>11} {'messages/s':>11} {'tok/msg':>8} {'messages':>9} {'seconds':>8}")
    for mode in MODES:
        r = result[mode]
        print(
            f"{mode:<11} {r['tokens_per_s']:>11,.0f} {r['messages_per_s']:>11,.0f} {r['tokens_per_message']:>8.1f} "
            f"{r['messages']:>9,} {r['seconds']:>8.2f}"
        )
    print(f"coalescing: {result['speedup']:.1f}x the tokens/s of one message per token")
    d = result["disconnect"]
    print(
        f"client disconnect → engine abort (engine stuck mid-step): median {d['median_ms']:.1f} ms, "
        f"max {d['max_ms']:.1f} ms over {d['runs']} runs"
    )


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="bench.transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(not args.no_uvloop)
        return None
    result = asyncio.run(bench_transport(args.tokens, args.runs, not args.no_uvloop))
    report(result)
    return result


if __name__ == "__main__":
    main()
