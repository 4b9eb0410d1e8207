"""The fit estimate (rbee/fit.py) against a real worker of the default model
at full load: every slot busy with a long prompt and the largest logprobs the
worker allows (the heaviest batch a client can ask for). The peak resident
memory of the worker and its engine processes (the sum of each process's
VmHWM) must not pass the estimate the queen places with (docs/queen.md,
"Fit") by more than UNDER_TOLERANCE, and the estimate must not waste more
than OVER_TOLERANCE of it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from rbee.cpus import read_cpu_flags
from rbee.fit import estimate, fit_facts
from rbee.v1 import inference_pb2, inference_pb2_grpc
from tests.fixtures.worker import WorkerProcess

pytestmark = pytest.mark.engine

# The estimate errs on the safe side: a little short is tolerated (the peak
# depends on the vLLM release and the allocator), much more is wasted memory.
UNDER_TOLERANCE = 0.05
OVER_TOLERANCE = 0.25


def peak_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def full_load(worker: WorkerProcess) -> None:
    """Every slot at once, each with a prompt of nearly the whole context
    and logprobs of the prompt and of each token at the worker's maximum
    (shorter prompts peak lower: 3247 MiB with 512 tokens each)."""
    with grpc.insecure_channel(worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), metadata=worker.metadata, timeout=30)
        prompt_ids = [(i * 7919) % 40000 + 100 for i in range(info.max_input_len - 64)]
        request = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenInput(ids=prompt_ids), max_tokens=16, logprobs=info.max_logprobs,
                                                prompt_logprobs=info.max_logprobs, temperature=1.0)  # fmt: skip

        def one(_: int) -> int:
            return len(list(stub.Generate(request, metadata=worker.metadata, timeout=600)))

        with ThreadPoolExecutor(info.max_n) as pool:
            assert all(n > 0 for n in pool.map(one, range(info.max_n)))


def test_the_estimate_covers_a_real_worker_at_full_load(real_worker, default_model: Path) -> None:
    full_load(real_worker)
    est = estimate(fit_facts(default_model, "cpu", read_cpu_flags()), 0)
    peak = peak_rss(real_worker.proc.pid)
    assert peak > est.weights + est.kv_cache  # the engine's processes are counted
    off = (est.total - peak) / peak
    print(f"estimate {est.total >> 20} MiB, peak at full load {peak >> 20} MiB ({off:+.1%})")
    assert -UNDER_TOLERANCE <= off <= OVER_TOLERANCE, f"estimate {est.total >> 20} MiB, measured peak {peak >> 20} MiB ({off:+.1%})"
