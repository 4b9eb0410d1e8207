"""Measured fits on the hive (rbee_hive/catalog/fits.py, rbee_hive/workers/peak.py):
a real models.db (SQLite), real processes whose peak memory is read from /proc."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

from rbee.fit import MiB, measurements
from rbee_hive.catalog.fits import MeasuredFit, listing_metadata
from rbee_hive.catalog.models import ModelCatalog, ModelRecord
from rbee_hive.workers.events import EventLog
from rbee_hive.workers.peak import PeakRecorder, tree_hwm
from rbee_hive.workers.process import WorkerProcess
from rbee_hive.workers.registry import WorkerRecord

REF = "hf:org/model"


def fit(peak: int, **settings) -> MeasuredFit:
    return MeasuredFit(**{"model_ref": REF, "backend": "cpu", "dtype": "float32", "slots": 8, "context": 2048, "peak_bytes": peak, **settings})


def test_a_key_keeps_its_highest_peak_and_the_listing_reads_back(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models.db")
    try:
        catalog.measured.record(fit(300 * MiB, measured_at_unix=100))
        catalog.measured.record(fit(200 * MiB, measured_at_unix=200))  # a lighter run does not lower it
        catalog.measured.record(fit(150 * MiB, slots=2, measured_at_unix=150))
        catalog.measured.record(fit(99 * MiB, model_ref="hf:org/other"))
        catalog.measured.record(fit(100 * MiB, full_load=True))  # a run at full load marks the row; the peak stays the highest
        rows = catalog.measured.for_model(REF)
        assert [(r.slots, r.peak_bytes, r.full_load) for r in rows] == [(8, 300 * MiB, True), (2, 150 * MiB, False)]
        listed = measurements(listing_metadata(rows))
        assert [(m.bytes, m.backend, m.dtype, m.slots, m.context, m.full_load) for m in listed] == [
            (300 * MiB, "cpu", "float32", 8, 2048, True), (150 * MiB, "cpu", "float32", 2, 2048, False)]
        assert listing_metadata([]) == {}
    finally:
        catalog.close()


def test_an_older_catalog_gains_the_table_and_keeps_its_models_and_a_removed_model_is_measured_afresh(tmp_path: Path) -> None:
    # A models.db as the previous release left it (schema version 1, one model).
    path = tmp_path / "models.db"
    from rbee_hive.catalog.models import MIGRATIONS

    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO models (provider, reference, local_path, size_bytes, format, downloaded_at_unix) "
                   "VALUES ('hf', 'org/model', ?, 1, 'safetensors', 1)", (str(tmp_path),))  # fmt: skip
        db.execute("PRAGMA user_version=1")
    catalog = ModelCatalog(path)
    try:
        assert [r.model_ref for r in catalog.list()] == [REF]
        catalog.measured.record(fit(300 * MiB))
        catalog.remove("hf", "org/model")
        assert catalog.measured.for_model(REF) == []
        catalog.add(ModelRecord("hf", "org/model", str(tmp_path), 1, "safetensors"))
        assert catalog.measured.for_model(REF) == []
    finally:
        catalog.close()


def test_tree_hwm_counts_each_process() -> None:
    import os

    own = tree_hwm([os.getpid()])
    assert own > 10 * MiB
    assert tree_hwm([os.getpid(), os.getpid()]) == 2 * own and tree_hwm([2**22 + 7]) == 0


# A worker stand-in: a child that touches 96 MiB and exits, then the leader waits to be stopped.
TREE = """
import subprocess, sys, time
subprocess.run([sys.executable, "-c", "import time; b = bytearray(96 * 1024 * 1024); time.sleep(1.5)"])
print("child done", flush=True)
time.sleep(600)
"""


def record_of(proc: WorkerProcess, model: Path, ready: bool) -> WorkerRecord:
    record = WorkerRecord(id="worker-t1", host="127.0.0.1", port=1, model_ref=REF, model_path=str(model), backend="cpu", device=0,
                          api_key="k", callback_key="c", log_path=model / "log", events=EventLog(), process=proc)  # fmt: skip
    record.ready, record.slots_total, record.slots_available, record.dtype = ready, 4, 0, "bfloat16"
    return record


@pytest.mark.asyncio
async def test_a_loaded_workers_peak_is_recorded_with_its_settings_and_an_exited_helper_still_counts(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    catalog = ModelCatalog(tmp_path / "models.db")
    lines: list[str] = []
    proc = await WorkerProcess.start(Path(sys.executable), ["-u", "-c", textwrap.dedent(TREE)], {"PATH": "/usr/bin:/bin"}, lines.append)
    try:
        recorder = PeakRecorder(catalog.measured, interval=0.1)
        record = record_of(proc, model, ready=True)
        follow = asyncio.get_running_loop().create_task(recorder.follow(record))
        while not lines:  # the helper has exited
            await proc.wait_for_exit(0.1)
        await recorder.sample_now(record)
        await proc.terminate(5)
        await follow
        [row] = catalog.measured.for_model(REF)
        # The helper's 96 MiB are in, though it had exited before the last sample.
        assert row.peak_bytes > 96 * MiB
        assert (row.backend, row.dtype, row.slots, row.context, row.device_peak_bytes) == ("cpu", "bfloat16", 4, 1024, 0)
        assert row.full_load  # every slot busy at the samples (slots_available 0 as the worker last reported)
        assert recorder.meters == {}
    finally:
        if proc.running:
            await proc.kill()
        catalog.close()


@pytest.mark.asyncio
async def test_a_worker_that_never_loaded_records_nothing(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models.db")
    proc = await WorkerProcess.start(Path(sys.executable), ["-c", "import time; time.sleep(0.5)"], {"PATH": "/usr/bin:/bin"}, lambda _: None)
    try:
        record = record_of(proc, tmp_path, ready=False)
        await PeakRecorder(catalog.measured, interval=0.1).follow(record)
        assert catalog.measured.for_model(REF) == []
    finally:
        catalog.close()


class FakeNvml:
    """NVML's calls the per-process figure uses (no GPU on this machine)."""

    class Proc:
        def __init__(self, pid: int, used: int | None) -> None:
            self.pid, self.usedGpuMemory = pid, used

    def __init__(self, procs: list, fail: bool = False) -> None:
        self.procs, self.fail, self.shutdowns = procs, fail, 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        if self.fail:
            raise RuntimeError("Not Supported")
        return self.procs


def test_device_memory_is_the_trees_processes_on_that_gpu() -> None:
    from rbee_hive.nvml import Nvml

    fake = FakeNvml([FakeNvml.Proc(10, 3 * MiB), FakeNvml.Proc(11, 5 * MiB), FakeNvml.Proc(99, 700 * MiB), FakeNvml.Proc(12, None)])
    assert Nvml(fake).process_memory(0, {10, 11, 12}) == 8 * MiB
    assert Nvml(fake).process_memory(0, {12}) is None  # NVML would not say
    assert Nvml(FakeNvml([], fail=True)).process_memory(0, {10}) is None and fake.shutdowns == 2
