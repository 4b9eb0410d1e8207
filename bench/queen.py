"""The queen's path as a user waits for it, measured side by side in one run.

Warm start: wall time from launching `rbee-keeper infer --node … --max-tokens 1`
(persistent queen, idle worker) to the first byte on its stdout, split into the
keeper's own start-up (`rbee-keeper --version`), the queen's task handling
(reported by the queen) and the worker's time to first token (reported by the
keeper); beside it the same prompt straight to the worker (`infer --worker`)
and a bare gRPC client process, rounds interleaved.

Cold start overhead: wall time of a cold `infer` minus the worker's own engine
start (llm-worker-rbee started by hand on the same model, to ready).

Run: .venv/bin/python -m bench.queen [--rounds 9] [--cold-rounds 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rbee.auth import auth_metadata, new_api_key
from rbee.config import default_model_path
from tests.fixtures.ports import free_port

BIN = Path(sys.executable).parent
PROMPT = "Say hello."

BARE_CLIENT = """
import sys, time, grpc
from rbee.v1 import inference_pb2, inference_pb2_grpc
address, key = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(address) as ch:
    stub = inference_pb2_grpc.InferenceServiceStub(ch)
    for msg in stub.Generate(inference_pb2.GenerateRequest(prompt=sys.argv[3], max_tokens=1, temperature=0),
                             metadata=(("authorization", "Bearer " + key),)):
        if msg.HasField("delta"):
            sys.stdout.write(msg.delta.text or "?"); sys.stdout.flush()
"""


def to_first_byte(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds from launch to the first byte on stdout, and the process's stderr."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - started
    _, err = proc.communicate(timeout=300)
    if not first or proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return elapsed, err.decode()


def wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Cluster:
    """A persistent queen with this machine as node `bench` (its own RBEE_HOME)."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.model = model
        self.home = root / "queen"
        self.node_home = root / "node"
        self.port = free_port()
        self.queen = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, RBEE_HOME=str(self.home), RBEE_HIVE_MODEL_DIRS=str(model.parent), PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen | None = None

    def keeper(self, *args: str) -> list[str]:
        return [str(BIN / "rbee-keeper"), *args, "--queen", self.queen]

    def start(self) -> None:
        self.home.mkdir(parents=True)
        log = open(self.root / "queen.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([str(BIN / "queen-rbee"), "daemon", "--port", str(self.port), "--http-port", "0"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while subprocess.run(self.keeper("setup", "list-nodes"), env=self.env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("queen did not start")
            time.sleep(0.2)
        subprocess.run(self.keeper("setup", "add-node", "--name", "bench", "--local", "--rbee-home", str(self.node_home),
                                   "--hive-port", str(free_port())), env=self.env, check=True, capture_output=True)  # fmt: skip

    def infer_argv(self, *extra: str) -> list[str]:
        return self.keeper("infer", "--node", "bench", "--model", f"file://{self.model}", "--prompt", PROMPT,
                           "--max-tokens", "1", "--temperature", "0", *extra)  # fmt: skip

    def worker_access(self) -> tuple[str, str]:
        """Address and key of the node's worker, asked of its hive with the node's key."""
        import grpc

        from rbee.v1 import registry_pb2, registry_pb2_grpc

        key = (self.node_home / "hive.key").read_text().strip()
        port = re.search(r"--port (\d+)", " ".join(_hive_cmdline(self.node_home))).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = registry_pb2_grpc.HiveWorkerServiceStub(ch)
            [w] = stub.ListWorkers(registry_pb2.ListWorkersRequest(), metadata=auth_metadata(key)).workers
            access = stub.GetWorkerAccess(registry_pb2.GetWorkerAccessRequest(worker_id=w.id), metadata=auth_metadata(key)).access
        return access.worker.address, access.api_key

    def shutdown_worker(self) -> None:
        import grpc

        from rbee.v1 import registry_pb2, registry_pb2_grpc

        key = (self.node_home / "hive.key").read_text().strip()
        port = re.search(r"--port (\d+)", " ".join(_hive_cmdline(self.node_home))).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = registry_pb2_grpc.HiveWorkerServiceStub(ch)
            for w in stub.ListWorkers(registry_pb2.ListWorkersRequest(), metadata=auth_metadata(key)).workers:
                stub.ShutdownWorker(registry_pb2.ShutdownWorkerRequest(worker_id=w.id, timeout_ms=5000), metadata=auth_metadata(key), timeout=120)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _hive_cmdline(node_home: Path) -> list[str]:
    import psutil

    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if "daemon" in (p.info["cmdline"] or []) and (p.info["environ"] or {}).get("RBEE_HOME") == str(node_home):
                return p.info["cmdline"]
        except psutil.Error:
            continue
    raise RuntimeError("no hive found")


def engine_start_alone(model: Path) -> float:
    """Seconds from starting llm-worker-rbee by hand to its readiness answering idle."""
    import grpc

    from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    port, key = free_port(), new_api_key()
    env = dict(os.environ, RBEE_WORKER_API_KEY=key)
    started = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "llm-worker-rbee"), "--model", str(model), "--backend", "cpu", "--device", "0",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            while True:
                try:
                    r = stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=auth_metadata(key), timeout=2, wait_for_ready=True)
                    if r.state == common_pb2.WORKER_STATE_IDLE:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError("the worker exited while loading")
                time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.queen")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cold-rounds", type=int, default=1)
    opts = parser.parse_args(argv)
    model = default_model_path()
    root = Path(tempfile.mkdtemp(prefix="rbee-bench-queen-"))
    first_cold, cold_walls, alone = [], [], []
    cluster = Cluster(root / "cluster", model)
    try:
        cluster.start()
        # The node's first cold start: hive start, worker environment, model registration, engine.
        started = time.perf_counter()
        to_first_byte(cluster.infer_argv(), cluster.env)
        first_cold.append(time.perf_counter() - started)
        for _ in range(opts.cold_rounds):
            # A cold start as it usually is: hive up, environment and catalog entry present, no worker.
            cluster.shutdown_worker()
            alone.append(engine_start_alone(model))
            started = time.perf_counter()
            to_first_byte(cluster.infer_argv(), cluster.env)
            cold_walls.append(time.perf_counter() - started)
        # Warm: the last cold cluster's worker is idle now.
        address, key = cluster.worker_access()
        keeper_alone, warm, queen_ms, ttft_ms, direct, bare = [], [], [], [], [], []
        direct_env = dict(cluster.env, RBEE_API_KEY=key)
        for _ in range(opts.rounds):
            keeper_alone.append(wall([str(BIN / "rbee-keeper"), "--version"], cluster.env))
            t, err = to_first_byte(cluster.infer_argv(), cluster.env)
            warm.append(t)
            queen_ms.append(float(re.search(r"\(queen: (\d+) ms\)", err).group(1)))
            ttft_ms.append(float(re.search(r"first token after (\d+) ms", err).group(1)))
            t, _ = to_first_byte([str(BIN / "rbee-keeper"), "infer", "--worker", address, "--prompt", PROMPT,
                                  "--max-tokens", "1", "--temperature", "0"], direct_env)  # fmt: skip
            direct.append(t)
            t, _ = to_first_byte([sys.executable, "-c", BARE_CLIENT, address, key, PROMPT], cluster.env)
            bare.append(t)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"Warm start, launch → first token on stdout (median of {opts.rounds} interleaved rounds):")
    print(f"  rbee-keeper infer --node (queen)     {med(warm) * 1000:8.0f} ms   (spec allows 5000 ms; aim < 500 ms)")
    print(f"    keeper start-up (--version)        {med(keeper_alone) * 1000:8.0f} ms")
    print(f"    queen task handling                {med(queen_ms):8.0f} ms")
    print(f"    worker time to first token         {med(ttft_ms):8.0f} ms")
    print(f"  rbee-keeper infer --worker (direct)  {med(direct) * 1000:8.0f} ms   queen/direct = {med(warm) / med(direct):.2f}")
    print(f"  bare gRPC client process             {med(bare) * 1000:8.0f} ms   queen/bare = {med(warm) / med(bare):.2f}")
    if cold_walls:
        overhead = [c - a for c, a in zip(cold_walls, alone)]
        print(f"Cold start ({opts.cold_rounds} round(s); hive running, worker environment and model registered):")
        print(f"  cold infer, launch → first token     {med(cold_walls):8.1f} s")
        print(f"  worker engine start alone → ready    {med(alone):8.1f} s")
        print(f"  rbee's own time on top (aim ≤ 2 s)   {med(overhead):8.1f} s")
        print(f"  first cold start of a fresh node     {med(first_cold):8.1f} s   (+ hive start, worker environment, model registration)")


if __name__ == "__main__":
    main(sys.argv[1:])
