"""The keeper's own cost, against a bare gRPC client, in the same run.

Every warm request pays the keeper's start-up. With one worker loaded, the
rounds (interleaved, so the machine's drift hits all alike) time whole
processes from launch to exit:

  python -c pass                     the interpreter alone
  rbee-keeper --version              the keeper's start-up without a command
  bare client                        a 12-line Python gRPC client: Generate, 1 token
  rbee-keeper infer --worker … -n 1  the same request through the keeper

and report the medians and keeper − bare (the aim: ≤ 0.1 s). `--stand-in`
serves the request from the stand-in worker (the real worker on a fake engine),
which isolates the client side from the engine's own variance.

Run: .venv/bin/python -m bench.keeper [--rounds 9] [--stand-in]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rbee.auth import auth_metadata, new_api_key
from rbee.config import default_model_path
from tests.fixtures.ports import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
PROMPT = "Say hello."

BARE_CLIENT = """
import sys, grpc
from rbee.v1 import inference_pb2, inference_pb2_grpc
address, key = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(address) as ch:
    stub = inference_pb2_grpc.InferenceServiceStub(ch)
    for msg in stub.Generate(inference_pb2.GenerateRequest(prompt=sys.argv[3], max_tokens=1, temperature=0),
                             metadata=(("authorization", "Bearer " + key),)):
        if msg.HasField("delta"):
            sys.stdout.write(msg.delta.text or "?")
sys.stdout.write("\\n")
"""


def start_worker(stand_in: bool) -> tuple[subprocess.Popen, str, str]:
    """A loaded worker (llm-worker-rbee on the default model, or the stand-in): process, address, key."""
    import grpc

    from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    port, key = free_port(), new_api_key()
    env = dict(os.environ, RBEE_WORKER_API_KEY=key, STANDIN_LOAD_S="0")
    if stand_in:
        # The real worker program on a fake engine (tests/unit/worker/fake_worker_main.py).
        argv = [sys.executable, "-m", "tests.unit.worker.fake_worker_main", "--model", str(default_model_path()),
                "--port", str(port)]  # fmt: skip
        env["PYTHONPATH"] = str(REPO)
    else:
        argv = [str(BIN / "llm-worker-rbee"), "--model", str(default_model_path()), "--backend", "cpu", "--device", "0",
                "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(argv + ["--api-key", key], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode} while loading")
            try:
                r = stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=auth_metadata(key), timeout=2, wait_for_ready=True)
                if r.state == common_pb2.WORKER_STATE_IDLE:
                    return proc, address, key
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError("the worker did not load within 600 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return elapsed


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.keeper")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--stand-in", action="store_true", help="the stand-in worker instead of the real engine")
    opts = parser.parse_args(argv)
    proc, address, key = start_worker(opts.stand_in)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    env["NO_COLOR"] = "1"
    runs = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "rbee-keeper --version": [str(BIN / "rbee-keeper"), "--version"],
        "bare client": [sys.executable, "-c", BARE_CLIENT, address, key, PROMPT],
        "rbee-keeper infer -n 1": [str(BIN / "rbee-keeper"), "--quiet", "infer", "--worker", address, "--api-key", key,
                                   "--prompt", PROMPT, "--max-tokens", "1", "--temperature", "0"],  # fmt: skip
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for name, cmd in runs.items():  # warm the page cache once
            wall(cmd, env)
        for _ in range(opts.rounds):
            for name, cmd in runs.items():
                times[name].append(wall(cmd, env))
    finally:
        stop(proc)
    worker = "stand-in worker" if opts.stand_in else "llm-worker-rbee (vLLM)"
    print(f"whole processes, median of {opts.rounds} interleaved rounds, one {worker} loaded:")
    for name, values in times.items():
        print(f"  {name:<26} {statistics.median(values) * 1000:7.0f} ms   (min {min(values) * 1000:.0f})")
    extra = statistics.median(times["rbee-keeper infer -n 1"]) - statistics.median(times["bare client"])
    print(f"  keeper − bare client       {extra * 1000:7.0f} ms   (aim: ≤ 100 ms)")


if __name__ == "__main__":
    main(sys.argv[1:])
