"""The cost of mutual TLS on the token stream: plain and TLS side by side in one run.

(1) Stream ceiling, no real engine: bench.transport's server process (the real
    InferenceServicer and grpc.aio server on uvloop, fed by the flood engine)
    with two servers, one plain and one mutual TLS with a worker certificate
    from a throwaway cluster CA in a temp folder; the client presents the CA's
    client certificate, as the queen does. One stream of --tokens tokens per
    server, the servers alternating, --runs runs: tokens/s of each run and the
    TLS/plain ratio.
(2) Real engine: two llm-worker-rbee processes of the default model with
    --slots 2, one given --tls-cert/--tls-key/--tls-ca (a certificate signed by
    a hive's issuing certificate, as a hive does for its workers), one plain.
    In each of --rounds rounds, one worker after the other (the order flips
    every round; the idle worker is frozen with SIGSTOP, never both at once):
      - connection setup: a fresh channel's time to READY (TCP, the TLS
        handshake, HTTP/2 settings), the channel then closed;
      - one greedy stream of --max-tokens tokens (ignore_eos) on a channel kept
        across rounds: time to first token (Generate sent → first TokenDelta
        with text, client side) and tokens/s over the whole stream.
    Per round: the TLS/plain ratio of tokens/s and the added milliseconds
    (TLS − plain) of TTFT and of connection setup; the report gives the median
    with a bootstrap 95 % interval (bench.contract's) and whether it contains
    1 (for the ratio) or 0 (for the differences).

The load average is printed before and after: the machine may be shared, and
another engine running meanwhile widens the intervals.

Run: .venv/bin/python -m bench.tls [--rounds 20] [--runs 6] [--tokens 50000] [--skip-engine]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psutil

from bench.contract import bootstrap_median
from bench.engine import PROMPT, Run, WorkerProcess, frozen
from bench.transport import flood_server, serve, serve_until_stdin_closes, server_process, stream
from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.config import default_model_path
from rbee.tls import CA_CERT, ISSUER_CERT, ISSUER_KEY, ClusterCA, Issuer, TlsIdentity, write_identity
from rbee.v1 import inference_pb2, inference_pb2_grpc

SIDES = ("plain", "tls")
WORKER_DIR = "worker"
# A fresh channel must not share a connection (subchannel) with the kept one.
FRESH_CHANNEL = (("grpc.use_local_subchannel_pool", 1),)


# -- certificates ----------------------------------------------------------------------


def throwaway_ca(root: Path) -> TlsIdentity:
    """A cluster CA below ``root``, a hive's issuing certificate from it, and a
    worker certificate signed by that (files in ``root/worker``, key 0600);
    returns the client identity a queen presents."""
    ca = ClusterCA(root / "queen")
    bundle = ca.node_bundle("bench", ["127.0.0.1"])
    issuer = Issuer.from_pem(bundle[ISSUER_CERT][0], bundle[ISSUER_KEY][0])
    write_identity(root / WORKER_DIR, issuer.issue_leaf("llm-worker-rbee bench", ["127.0.0.1"]), ca.ca_pem())
    return ca.client_identity()


def worker_files(root: Path) -> tuple[Path, Path, Path]:
    folder = root / WORKER_DIR
    return folder / "tls.crt", folder / "tls.key", folder / CA_CERT


# -- statistics ------------------------------------------------------------------------


def interval(values: list[float], rng: random.Random, null: float) -> dict:
    """Median with a bootstrap 95 % interval, and whether the interval holds ``null``
    (1 for a ratio, 0 for a difference)."""
    median, low, high = bootstrap_median(values, rng)
    return {"median": median, "ci95": [low, high], "contains_null": low <= null <= high, "null": null}


def describe(i: dict, fmt: str = "{:.3f}", unit: str = "") -> str:
    """'0.981 [0.950, 1.012] (contains 1)'."""
    null = f"{i['null']:g}"
    verdict = f"contains {null}" if i["contains_null"] else f"excludes {null}"
    low, high = (fmt.format(v) for v in i["ci95"])
    return f"{fmt.format(i['median'])}{unit} [{low}, {high}] ({verdict})"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- (1) stream ceiling ----------------------------------------------------------------


async def _serve(root: Path) -> None:
    crt, key, ca = worker_files(root)
    tls = TlsIdentity.load(crt, key, ca)
    servers = [await flood_server("bench-plain"), await flood_server("bench-tls", tls=tls)]
    await serve_until_stdin_closes(servers)


async def bench_ceiling(root: Path, client: TlsIdentity, tokens: int, runs: int, rng: random.Random) -> dict:
    credentials = {"plain": None, "tls": client}
    with server_process("bench.tls", "--tls-dir", str(root)) as listed:
        addresses = dict(zip(SIDES, listed))
        for side in SIDES:  # warm up code paths
            await stream(addresses[side], 2_000, credentials[side])
        samples: dict[str, list[float]] = {side: [] for side in SIDES}
        for i in range(runs):
            for side in SIDES if i % 2 == 0 else reversed(SIDES):
                samples[side].append((await stream(addresses[side], tokens, credentials[side]))["tokens_per_s"])
            print(f"[bench] ceiling run {i + 1}/{runs}: plain {samples['plain'][-1]:,.0f} tok/s, "
                  f"TLS {samples['tls'][-1]:,.0f} tok/s", file=sys.stderr)
    ratios = [t / p for p, t in zip(samples["plain"], samples["tls"], strict=True)]
    return {
        "tokens_per_stream": tokens,
        "runs": runs,
        "plain_tokens_per_s": samples["plain"],
        "tls_tokens_per_s": samples["tls"],
        "ratio": interval(ratios, rng, 1.0),
    }


def report_ceiling(r: dict) -> None:
    print(f"(1) stream ceiling: flood engine, real servicer on uvloop, one stream of {r['tokens_per_stream']:,} tokens "
          f"per server, {r['runs']} alternating runs")
    print(f"    {'run':>5} {'plain tok/s':>12} {'TLS tok/s':>12} {'TLS/plain':>10}")
    for i, (p, t) in enumerate(zip(r["plain_tokens_per_s"], r["tls_tokens_per_s"]), 1):
        print(f"    {i:>5} {p:>12,.0f} {t:>12,.0f} {t / p:>10.3f}")
    print(f"    {'median':>5} {statistics.median(r['plain_tokens_per_s']):>12,.0f} "
          f"{statistics.median(r['tls_tokens_per_s']):>12,.0f}")
    print(f"    tokens/s TLS/plain {describe(r['ratio'])}")


# -- (2) real engine -------------------------------------------------------------------


async def time_to_ready(address: str, tls: TlsIdentity | None) -> float:
    """Seconds from opening a fresh channel to READY (connect, handshake, settings)."""
    start = time.perf_counter()
    channel = open_channel(address, tls, options=FRESH_CHANNEL)
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        return time.perf_counter() - start
    finally:
        await channel.close()


async def timed_stream(stub, md, max_tokens: int) -> Run:
    """One greedy stream; TTFT is Generate sent → first TokenDelta with text."""
    request = inference_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    )
    start = time.perf_counter()
    first = None
    tokens = 0
    async for msg in stub.Generate(request, metadata=md):
        if msg.HasField("delta"):
            if first is None and msg.delta.text:
                first = time.perf_counter()
            tokens += len(msg.delta.token_ids)
    end = time.perf_counter()
    if tokens != max_tokens:
        raise RuntimeError(f"stream ended after {tokens} of {max_tokens} tokens")
    return Run((first or end) - start, tokens, end - start)


async def bench_engine(root: Path, client: TlsIdentity, args: argparse.Namespace, rng: random.Random) -> dict:
    model = Path(args.model)
    crt, key, ca = worker_files(root)
    print(f"[bench] starting two workers (slots {args.slots}) on {model.name}, one with mutual TLS", file=sys.stderr)
    workers = {
        "plain": WorkerProcess(model, args.slots),
        "tls": WorkerProcess(model, args.slots, ["--tls-cert", str(crt), "--tls-key", str(key), "--tls-ca", str(ca)],
                             tls=client),
    }
    credentials = {"plain": None, "tls": client}
    kept: dict[str, grpc.aio.Channel] = {}
    try:
        await asyncio.gather(*(w.wait_loaded() for w in workers.values()))
        procs = {side: [psutil.Process(w.proc.pid), *psutil.Process(w.proc.pid).children(recursive=True)]
                 for side, w in workers.items()}
        # The same channel options on both sides: those rbee's clients use.
        kept = {side: open_channel(workers[side].address, credentials[side]) for side in SIDES}
        stubs = {side: inference_pb2_grpc.InferenceServiceStub(kept[side]) for side in SIDES}
        md = {side: auth_metadata(workers[side].api_key) for side in SIDES}
        reconnects = 0

        async def one(side: str) -> tuple[float, Run]:
            nonlocal reconnects
            connect = await time_to_ready(workers[side].address, credentials[side])
            # The kept channel may have dropped its connection while its
            # worker was frozen (a keepalive ping unanswered): reconnect
            # before the stream is timed, and count it.
            if kept[side].get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
                reconnects += 1
                await asyncio.wait_for(kept[side].channel_ready(), 30)
            return connect, await timed_stream(stubs[side], md[side], args.max_tokens)

        other = {"plain": "tls", "tls": "plain"}
        for side in SIDES:  # warm both paths
            with frozen(procs[other[side]]):
                await one(side)
        reconnects = 0
        samples: dict[str, list[tuple[float, Run]]] = {side: [] for side in SIDES}
        for i in range(args.rounds):
            for side in SIDES if i % 2 == 0 else tuple(reversed(SIDES)):
                with frozen(procs[other[side]]):
                    samples[side].append(await one(side))
            (pc, pr), (tc, tr) = samples["plain"][-1], samples["tls"][-1]
            print(f"[bench] round {i + 1}/{args.rounds}: plain {pr.tokens_per_s:.1f} tok/s TTFT {pr.ttft_s * 1000:.1f} ms "
                  f"connect {pc * 1000:.2f} ms; TLS {tr.tokens_per_s:.1f} tok/s TTFT {tr.ttft_s * 1000:.1f} ms "
                  f"connect {tc * 1000:.2f} ms", file=sys.stderr)
    finally:
        for channel in kept.values():
            await channel.close()
        await asyncio.gather(*(w.close() for w in workers.values()))

    plain, tls = samples["plain"], samples["tls"]
    result: dict = {"model": model.name, "slots": args.slots, "max_tokens": args.max_tokens, "rounds": args.rounds,
                    "reconnects": reconnects}
    for side, runs in samples.items():
        result[side] = {
            "tokens_per_s": statistics.median(r.tokens_per_s for _, r in runs),
            "ttft_ms": statistics.median(r.ttft_s for _, r in runs) * 1000,
            "connect_ms": statistics.median(c for c, _ in runs) * 1000,
        }
    pairs = list(zip(plain, tls, strict=True))
    result["tokens_per_s_ratio"] = interval([t.tokens_per_s / p.tokens_per_s for (_, p), (_, t) in pairs], rng, 1.0)
    result["added_ttft_ms"] = interval([(t.ttft_s - p.ttft_s) * 1000 for (_, p), (_, t) in pairs], rng, 0.0)
    result["added_connect_ms"] = interval([(tc - pc) * 1000 for (pc, _), (tc, _) in pairs], rng, 0.0)
    return result


def report_engine(r: dict) -> None:
    print(f"(2) real engine: {r['model']}, two workers with {r['slots']} slots, one greedy stream of {r['max_tokens']} "
          f"tokens (ignore_eos) per worker per round, {r['rounds']} alternating rounds, the idle worker frozen")
    print(f"    {'median':<34} {'plain':>9} {'TLS':>9}")
    print(f"    {'tokens/s (kept channel)':<34} {r['plain']['tokens_per_s']:>9.1f} {r['tls']['tokens_per_s']:>9.1f}")
    print(f"    {'TTFT ms (kept channel)':<34} {r['plain']['ttft_ms']:>9.1f} {r['tls']['ttft_ms']:>9.1f}")
    print(f"    {'fresh channel to READY, ms':<34} {r['plain']['connect_ms']:>9.2f} {r['tls']['connect_ms']:>9.2f}")
    print(f"    tokens/s TLS/plain        {describe(r['tokens_per_s_ratio'])}")
    print(f"    TTFT TLS − plain          {describe(r['added_ttft_ms'], '{:+.2f}', ' ms')}")
    print(f"    TLS handshake (fresh channel to READY, TLS − plain) {describe(r['added_connect_ms'], '{:+.2f}', ' ms')}")
    if r["reconnects"]:
        print(f"    (the kept channels reconnected {r['reconnects']} times between streams, outside the timing)")


# -- main ------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds on the real engine (default 20)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per real-engine stream (default 64)")
    parser.add_argument("--slots", type=int, default=2, help="slots of each real worker (default 2)")
    parser.add_argument("--runs", type=int, default=6, help="alternating runs of the stream ceiling (default 6)")
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens per stream-ceiling stream (default 50000)")
    parser.add_argument("--skip-engine", action="store_true", help="only the stream ceiling (1)")
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="rbee-bench-tls-") as tmp:
        root = Path(tmp)
        client = throwaway_ca(root)
        results = {"ceiling": await bench_ceiling(root, client, args.tokens, args.runs, rng)}
        report_ceiling(results["ceiling"])
        if not args.skip_engine:
            results["engine"] = await bench_engine(root, client, args, rng)
            report_engine(results["engine"])
    return results


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.serve:
        serve(True, lambda: _serve(Path(args.tls_dir)))
        return None
    started = time.monotonic()
    before = load()
    results = asyncio.run(main_async(args))
    print(f"load average (1, 5, 15 min) before {before}, after {load()}; {os.cpu_count()} cores")
    print(f"(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
