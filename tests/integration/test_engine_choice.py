"""A real worker of the default model says which dtype it chose on this
machine and why, and binds its engine's threads to the cores it may use."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from rbee.channel import open_channel
from rbee.cpus import format_cpu_list
from rbee.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.engine


def this_cpu_has_native_bf16() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


async def test_real_worker_reports_its_dtype_threads_and_kv_cache(real_worker):
    async with open_channel(real_worker.address) as channel:
        info = await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
            inference_pb2.GetModelInfoRequest(), metadata=real_worker.metadata
        )
    if this_cpu_has_native_bf16():
        assert info.dtype == "bfloat16"
        assert info.dtype_reason.startswith("this CPU has native bfloat16")
    else:
        assert info.dtype == "float32"
        assert info.dtype_reason.startswith("this CPU has no native bfloat16")
    allowed = sorted(os.sched_getaffinity(real_worker.pid))
    # Every core the worker may use but one, left to vLLM's scheduler (the one core when alone).
    cores = allowed[:-1] if len(allowed) > 1 else allowed
    assert info.cpu_set == format_cpu_list(cores)
    assert info.cpu_threads == len(cores)
    assert info.kv_cache_bytes > 0
    log = real_worker.log_text()
    # The choice is a loading stage, and vLLM's engine bound its OpenMP threads to those cores.
    assert f"engine_config: dtype {info.dtype}: {info.dtype_reason}" in log
    assert f"core ids={cores}" in log
    assert "Explicitly set" in log  # the KV cache size came from the worker, not vLLM's default
    # The engine's processes run where the worker may run.
    for child in psutil.Process(real_worker.pid).children(recursive=True):
        assert set(child.cpu_affinity()) <= set(allowed)
