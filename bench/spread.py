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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rbee.config import default_model_path
from tests.fixtures.hive import write_standin_program
from tests.fixtures.ports import free_port

BIN = Path(sys.executable).parent
KEY = "bench-spread-admin-key"
# Each request: a few tokens, each a few ms of the fake engine, so requests overlap.
MAX_TOKENS = 4
TOKEN_DELAY_S = "0.005"


class Queen:
    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.counts = root / "counts"
        self.counts.mkdir(parents=True)
        self.port, self.http_port = free_port(), free_port()
        program = write_standin_program(root / "standin")
        self.env = dict(os.environ, RBEE_HOME=str(root / "queen"), RBEE_HIVE_MODEL_DIRS=str(model.parent), RBEE_QUEEN_API_KEY=KEY,
                        RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WORKER_ENV="STANDIN_*", STANDIN_COUNT_DIR=str(self.counts),
                        STANDIN_LOAD_S="0.2", FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY=TOKEN_DELAY_S, PYTHONUNBUFFERED="1")  # fmt: skip
        # The stand-in's engine reads FAKE_ENGINE_* from its environment, which the hive passes on as STANDIN_*.
        self.env["RBEE_HIVE_WORKER_ENV"] = "STANDIN_*,FAKE_ENGINE_*"
        self.model = f"file://{model}"
        self.proc: subprocess.Popen | None = None

    def keeper(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "rbee-keeper"), *args, "--queen", f"127.0.0.1:{self.port}"], env=self.env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    def start(self) -> None:
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


async def load(queen: Queen, clients: int, requests: int) -> tuple[int, float]:
    """``requests`` chat completions from ``clients`` concurrent clients; (failures, seconds)."""
    body = {"model": queen.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
    failures = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{queen.http_port}", timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as http:  # fmt: skip

        async def client(n: int) -> None:
            nonlocal failures
            for _ in range(n):
                resp = await http.post("/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    failures += 1

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
    print(f"{replicas} replicas, {clients} clients, {requests} requests in {seconds:.1f} s ({failures} failed"
          f"{f', {others} on other workers' if others else ''}): per replica {sorted(per.values(), reverse=True)}, "
          f"max/min {ratio:.3f} (goal ≤ 1.1: {'met' if ratio <= 1.1 else 'MISSED'})")  # fmt: skip
    return {"replicas": replicas, "per_replica": per, "max_min": ratio, "failures": failures, "seconds": seconds}


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
