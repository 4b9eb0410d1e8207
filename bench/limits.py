"""What a hostile client costs a daemon (docs/security.md).

1. Memory before authentication: a real hive, queen and worker each get 16
   concurrent unauthenticated calls of 60 MB; the daemon's resident memory
   before, its peak during (the kernel's high-water mark, reset first) and
   what it keeps after.
2. Health under a huge prompt: a real worker program with a real tokenizer
   (the default model's; vLLM is not started, the engine only tokenizes)
   gets a 16 MB prompt with the right key, and its health is probed every
   0.2 s while that request is in flight; then the largest prompt a 128k
   context accepts, which is tokenized for real.

    python -m bench limits            # both
    python -m bench.limits --memory   # only the first
    python -m bench.limits --health   # only the second

`--source DIR` runs the daemons from another checkout's packages (with
this file copied there), e.g. the code before a change, for a before/after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.fixtures.ports import free_port

MB = 1_000_000
# Where the daemons' packages come from (--source); None: the installed ones.
SOURCE: Path | None = None
# Runs a module from SOURCE: the editable install's import hook would
# otherwise take the installed packages whatever sys.path says.
_LAUNCH = (
    "import runpy, sys; src, mod = sys.argv[1], sys.argv[2]; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
    "sys.path.insert(0, src); sys.argv = [mod, *sys.argv[3:]]; runpy.run_module(mod, run_name='__main__', alter_sys=True)"
)


def python(module: str, *args: str) -> list[str]:
    if SOURCE is None:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-c", _LAUNCH, str(SOURCE), module, *args]


def reset_peak(pid: int) -> None:
    """Start the kernel's high-water mark of ``pid``'s memory afresh."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory(pid: int) -> dict[str, int]:
    """Resident memory now (VmRSS) and at its peak (VmHWM), in bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0]) * 1024
    return figures


def flood(address: str, method: str, calls: int, size: int, metadata: Sequence[tuple[str, str]] = ()) -> Counter:
    """``calls`` concurrent calls of ``method`` carrying ``size`` bytes each;
    how they were answered (status code and the start of the message)."""
    payload = b"\x0a" + b"\x80\x80\x80\x80\x01" + b"x" * size  # field 1, a length no parser reaches
    outcomes: Counter = Counter()
    lock = threading.Lock()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(method)

        def one() -> None:
            try:
                call(payload, timeout=120, metadata=tuple(metadata))
                what = "OK"
            except grpc.RpcError as err:
                what = f"{err.code().name}: {(err.details() or '')[:60]}"
            with lock:
                outcomes[what] += 1

        threads = [threading.Thread(target=one) for _ in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return outcomes


def flood_memory(pid: int, address: str, method: str, calls: int = 16, size: int = 60 * MB) -> dict:
    """The daemon's memory around a flood of unauthenticated calls."""
    before = memory(pid)["VmRSS"]
    reset_peak(pid)
    outcomes = flood(address, method, calls, size)
    time.sleep(1)  # let the daemon finish with what it took in
    after = memory(pid)
    return {"before": before, "peak": after["VmHWM"], "after": after["VmRSS"], "outcomes": outcomes}


# -- the daemons --------------------------------------------------------------------


class Daemon:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self.address = f"127.0.0.1:{port}"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(SOURCE or Path.cwd()), start_new_session=True)  # fmt: skip

    def wait_health(self, timeout: float = 120) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2, wait_for_ready=True)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{self.name} did not answer:\n{self.log.read_text(errors='replace')[-3000:]}") from None

    def stop(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


def _env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "no-config.toml").write_text("")
    env = dict(os.environ, RBEE_HOME=str(home), RBEE_CONFIG=str(home / "no-config.toml"), HOME=str(home),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)  # fmt: skip
    return env


def start_hive(base: Path) -> Daemon:
    port = free_port()
    env = _env(base / "hive", RBEE_HIVE_API_KEY="bench-hive-key")
    return Daemon("rbee-hive", python("rbee_hive.cli", "daemon", "--port", str(port)), env, port, base / "hive.log")


def start_queen(base: Path) -> Daemon:
    port = free_port()
    env = _env(base / "queen", RBEE_QUEEN_API_KEY="bench-queen-key", RBEE_QUEEN_HTTP_PORT="0")
    return Daemon("queen-rbee", python("rbee_queen.cli", "daemon", "--port", str(port)), env, port, base / "queen.log")


def start_worker(base: Path, model: Path, *flags: str) -> Daemon:
    """The real worker program with an engine that only tokenizes (no vLLM)."""
    port = free_port()
    env = _env(base / f"worker-{port}", RBEE_WORKER_API_KEY=WORKER_KEY)
    argv = python("bench.limits", "--serve-worker", "--model", str(model), "--port", str(port), *flags)
    return Daemon("llm-worker-rbee", argv, env, port, base / f"worker-{port}.log")


WORKER_KEY = "bench-worker-key"
ATTACKS = (
    ("rbee-hive", start_hive, "/rbee.v1.HiveWorkerService/SpawnWorker"),
    ("queen-rbee", start_queen, "/rbee.v1.NodeService/AddNode"),
)


def memory_bench(base: Path, model: Path | None) -> None:
    print("Memory before authentication: 16 concurrent unauthenticated calls of 60 MB each")
    starters: list[tuple[str, Callable[[], Daemon], str]] = [(n, lambda s=s: s(base), m) for n, s, m in ATTACKS]
    if model is not None:
        starters.append(("llm-worker-rbee", lambda: start_worker(base, model), "/rbee.v1.InferenceService/Generate"))
    for name, start, method in starters:
        daemon = start()
        try:
            daemon.wait_health()
            time.sleep(1)
            m = flood_memory(daemon.proc.pid, daemon.address, method)
        finally:
            daemon.stop()
        answers = ", ".join(f"{n} × {what}" for what, n in m["outcomes"].items())
        print(f"  {name:16} RSS before {m['before'] / MB:6.0f} MB  peak {m['peak'] / MB:6.0f} MB  "
              f"after {m['after'] / MB:6.0f} MB   answers: {answers}")  # fmt: skip


# -- health under a huge prompt --------------------------------------------------


def serve_worker(argv: list[str]) -> int:
    """llm-worker-rbee's own main with an engine that tokenizes for real and
    generates one token (vLLM would add a minute of start-up and nothing to
    what is measured here: the request's way to the engine)."""
    from rbee_worker.engine import Delta, Engine, EngineInfo, LoadProgress, encode_chat, encode_prompt
    from rbee_worker.program import main as worker_main

    class TokenizerOnly(Engine):
        def __init__(self, settings) -> None:
            self.path, self.max_model_len, self.tok = settings.model_path, settings.max_model_len, None

        async def load(self, progress):
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(self.path)
            progress(LoadProgress("ready", 1, 1, "tokenizer loaded"))
            return EngineInfo(max_model_len=self.max_model_len, engine_version="tokenizer-only",
                              vocab_size=len(self.tok), has_chat_template=bool(self.tok.chat_template))  # fmt: skip

        def encode(self, prompt, raw_prompt):
            return encode_prompt(self.tok, prompt, raw_prompt)

        def encode_chat(self, messages):
            return encode_chat(self.tok, messages)

        async def generate(self, request_id, prompt_token_ids, options):
            yield Delta(token_ids=[1], text="x", finished=True, finish_reason="length", prompt_tokens=len(prompt_token_ids))

        async def abort(self, request_id):
            pass

        async def health(self):
            pass

        async def shutdown(self):
            pass

    return worker_main(argv, engine_factory=TokenizerOnly)


def probe_health_during(address: str, request: Callable[[], str], every_s: float = 0.2) -> dict:
    """Run ``request`` on a thread; probe health every ``every_s`` while it runs."""
    result: dict = {}

    def run() -> None:
        started = time.monotonic()
        result["answer"] = request()
        result["request_s"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    latencies: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        thread.start()
        while thread.is_alive():
            started = time.monotonic()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
            except grpc.RpcError:
                pass
            latencies.append(time.monotonic() - started)
            time.sleep(every_s)
    thread.join()
    result["latencies"] = latencies
    return result


def generate_once(address: str, prompt: str) -> str:
    from rbee.auth import auth_metadata
    from rbee.v1 import inference_pb2, inference_pb2_grpc

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            for _ in stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, max_tokens=1),
                                   metadata=auth_metadata(WORKER_KEY), timeout=300):  # fmt: skip
                pass
            return "OK"
        except grpc.RpcError as err:
            return f"{err.code().name}: {(err.details() or '')[:90]}"


def health_bench(base: Path, model: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog. "
    cases = (
        ("16 MB prompt, --max-model-len 2048", (), 16 * MB),
        ("4 MB prompt, --max-model-len 131072", ("--max-model-len", "131072"), 4 * MB),
    )
    print("Health while one request is in flight (probes every 0.2 s)")
    for label, flags, size in cases:
        worker = start_worker(base, model, *flags)
        try:
            worker.wait_health()
            before = memory(worker.proc.pid)["VmRSS"]
            reset_peak(worker.proc.pid)
            prompt = (text * (size // len(text) + 1))[:size]
            r = probe_health_during(worker.address, lambda p=prompt: generate_once(worker.address, p))
            peak = memory(worker.proc.pid)["VmHWM"]
        finally:
            worker.stop()
        lat = r["latencies"] or [0.0]
        print(f"  {label}: request {r['request_s']:.2f} s -> {r['answer']}")
        print(f"    health: {len(lat)} probes, median {statistics.median(lat) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms; worker RSS {before / MB:.0f} MB, peak {peak / MB:.0f} MB")  # fmt: skip


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.limits")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--health", action="store_true")
    p.add_argument("--model", type=Path, default=None, help="a model folder with tokenizer files (default: the default model's)")
    p.add_argument("--source", type=Path, default=None, help="run the daemons from this checkout's packages")
    args = p.parse_args(list(argv))
    global SOURCE
    SOURCE = args.source.resolve() if args.source else None
    from rbee.config import default_model_path

    model = args.model or default_model_path()
    if not (model / "tokenizer.json").exists() and not (model / "tokenizer_config.json").exists():
        print(f"(no tokenizer in {model}: the worker parts are skipped; run `make model` first)")
        model = None
    both = not (args.memory or args.health)
    with tempfile.TemporaryDirectory(prefix="rbee-bench-limits-") as tmp:
        if args.memory or both:
            memory_bench(Path(tmp), model)
        if (args.health or both) and model is not None:
            health_bench(Path(tmp), model)


if __name__ == "__main__":
    if "--serve-worker" in sys.argv:
        sys.argv.remove("--serve-worker")
        sys.exit(serve_worker(sys.argv[1:]))
    main(sys.argv[1:])
