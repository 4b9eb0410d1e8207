"""Load spread over replicas (docs/queen.md, "Placement" and "Replicas"): a
real queen (its own process, HTTP front door on) with this machine as node
`bench`, the model deployed with 2 and then 4 replicas
(`rbee-keeper models deploy --replicas N`), each a stand-in worker (the real
worker program and servicer on a fake engine, tests/unit/worker/
fake_worker_main.py); 64 concurrent clients each send their share of the
requests through the front door (`/v1/chat/completions`), one after
another. Each worker counts the requests its engine took (the stand-in's
STANDIN_COUNT_DIR); reported: requests per replica and max/min, goal ≤ 1.1.
Each replica count runs on a fresh queen; --same-queen scales one
deployment up through the counts instead (2, then 4 on the same queen).

Run: .venv/bin/python -m bench.spread [--requests 1024] [--clients 64] [--replicas 2 4] [--same-queen]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from rbee.config import default_model_path
from bench import openai
from tests.fixtures.hive import write_standin_program

# Each request: a few tokens, each a few ms of the fake engine, so requests overlap.
MAX_TOKENS = 4
TOKEN_DELAY_S = "0.005"


class Queen(openai.Queen):
    """bench.openai's queen (its own process, this machine as node `bench`)
    whose hive runs stand-in workers that count their requests."""

    def __init__(self, root: Path, model: Path) -> None:
        self.counts = root / "counts"
        self.counts.mkdir(parents=True)
        program = write_standin_program(root / "standin")
        # The stand-in's engine reads FAKE_ENGINE_*: the hive passes on what RBEE_HIVE_WORKER_ENV names.
        super().__init__(root, model, dict(os.environ, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WORKER_ENV="STANDIN_*,FAKE_ENGINE_*",
                                           STANDIN_COUNT_DIR=str(self.counts), STANDIN_LOAD_S="0.2", FAKE_ENGINE_MODE="slow",
                                           FAKE_ENGINE_DELAY=TOKEN_DELAY_S))  # fmt: skip

    def start(self) -> None:
        self.serve()

    def workers(self) -> list[dict]:
        listed = self.keeper("workers", "list", "--json")
        return [json.loads(line) for line in listed.stdout.splitlines()] if listed.returncode == 0 else []

    def deploy(self, replicas: int) -> list[str]:
        """The model deployed with ``replicas`` workers; their ids once all are idle."""
        done = self.keeper("models", "deploy", self.model, "--replicas", str(replicas))
        if done.returncode:
            raise SystemExit(done.stderr)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            idle = [w["id"] for w in self.workers() if w.get("state") == "idle"]
            if len(idle) == replicas and len(self.workers()) == replicas:
                return idle
            time.sleep(0.5)
        raise SystemExit(f"{replicas} replicas did not become idle: {self.workers()}; log {self.root / 'queen.log'}")

    def served(self) -> dict[str, int]:
        return {p.name.removesuffix(".requests"): len(p.read_text().splitlines()) for p in self.counts.glob("*.requests")}


async def load(queen: Queen, clients: int, requests: int) -> tuple[Counter, float]:
    """``requests`` chat completions from ``clients`` concurrent clients; (failures by status and code, seconds)."""
    body = {"model": queen.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
    failures: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{queen.http_port}", timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {openai.KEY}"}) as http:  # fmt: skip

        async def client(n: int) -> None:
            for _ in range(n):
                resp = await http.post("/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    failures[f"{resp.status_code} {resp.json().get('error', {}).get('code', '')}".strip()] += 1

        shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
        started = time.perf_counter()
        await asyncio.gather(*(client(n) for n in shares))
        return failures, time.perf_counter() - started


def spread(queen: Queen, replicas: int, clients: int, requests: int) -> dict:
    ids = queen.deploy(replicas)
    before = queen.served()
    failures, seconds = asyncio.run(load(queen, clients, requests))
    after = queen.served()
    per = {w: after.get(w, 0) - before.get(w, 0) for w in ids}
    others = sum(after.values()) - sum(before.values()) - sum(per.values())
    ratio = max(per.values()) / min(per.values()) if min(per.values()) > 0 else float("inf")
    failed = ", ".join(f"{n} × {what}" for what, n in failures.items()) or "none"
    print(f"{replicas} replicas, {clients} clients, {requests} requests in {seconds:.1f} s (failed: {failed}"
          f"{f', {others} on other workers' if others else ''}): per replica {sorted(per.values(), reverse=True)}, "
          f"max/min {ratio:.3f} (goal ≤ 1.1: {'met' if ratio <= 1.1 else 'MISSED'})")  # fmt: skip
    return {"replicas": replicas, "per_replica": per, "max_min": ratio, "failures": dict(failures), "seconds": seconds}


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench.spread")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--same-queen", action="store_true",
                        help="scale one deployment up through the counts instead of a fresh queen for each")  # fmt: skip
    args = parser.parse_args(argv)
    groups = [args.replicas] if args.same_queen else [[n] for n in args.replicas]
    results = []
    for counts in groups:
        root = Path(tempfile.mkdtemp(prefix="rbee-bench-spread-"))
        queen = Queen(root, default_model_path())
        try:
            queen.start()
            for n in counts:
                results.append(spread(queen, n, args.clients, args.requests))
        finally:
            queen.stop()
            shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
