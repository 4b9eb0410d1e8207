"""A real hive gives its CPU workers their own cores: two workers (the real
worker program on the fake engine) get disjoint CPU affinities, each reports
the cores it runs on, and the listing shows them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rbee.cpus import format_cpu_list, parse_cpu_list
from rbee.v1 import common_pb2
from tests.fixtures.common import REPO

pytestmark = pytest.mark.asyncio(loop_scope="session")


def fake_engine_worker(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "llm-worker-rbee"
    program.write_text(f'#!/bin/sh\ncd "{REPO}"\nexec "{sys.executable}" -m tests.unit.worker.fake_worker_main "$@"\n')
    program.chmod(0o755)
    return program


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to give two workers one each")
async def test_two_workers_get_disjoint_cores(start_hive, model, tmp_path):
    hive = await start_hive(
        worker_binary=fake_engine_worker(tmp_path / "bin"),
        extra_env={"RBEE_HIVE_WORKER_CORES": "1", "RBEE_HIVE_WORKER_DTYPE": "float32"},
    )
    first = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    second = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    workers = {w.id: w for w in await hive.list()}
    a, b = workers[first.worker.id], workers[second.worker.id]
    assert a.state in (common_pb2.WORKER_STATE_IDLE, common_pb2.WORKER_STATE_BUSY)
    cores_a, cores_b = set(parse_cpu_list(a.cpu_set)), set(parse_cpu_list(b.cpu_set))
    assert len(cores_a) == len(cores_b) == 1
    assert not cores_a & cores_b
    # What the kernel holds for each process is what the listing says.
    assert os.sched_getaffinity(a.pid) == cores_a
    assert os.sched_getaffinity(b.pid) == cores_b
    log = hive.text()
    assert f"{a.id} runs on cores {format_cpu_list(cores_a)} (its own" in log
    # The hive's worker_dtype reaches each worker as --dtype.
    worker_log = next(hive.home.rglob(f"{a.id}.log")).read_text()
    assert "--dtype float32" in worker_log


async def test_a_worker_beyond_the_free_cores_shares_and_the_hive_says_why(start_hive, model, tmp_path):
    cores = len(os.sched_getaffinity(0))
    hive = await start_hive(worker_binary=fake_engine_worker(tmp_path / "bin"), extra_env={"RBEE_HIVE_WORKER_CORES": str(cores)})
    first = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    second = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    workers = {w.id: w for w in await hive.list()}
    assert workers[second.worker.id].cpu_set == workers[first.worker.id].cpu_set
    assert f"shared with {first.worker.id}: only 0 of the hive's {cores} cores are free" in hive.text()
