"""Each worker's peak memory, measured while it lives and kept in the model
catalog's ``measured_fits`` (rbee_hive/catalog/fits.py) for the queen's fit
(docs/queen.md, "Fit").

The figure is the sum of VmHWM (each process's resident high-water mark)
over the worker's process tree: the worker, its engine process and the
engine's own workers. It is sampled every ``interval`` while the worker
runs and once more when the hive stops it; the highest sum seen is kept,
so a helper process that exits early still counts. On CUDA the device
memory the tree holds is sampled too (NVML's per-process figure: NVML
keeps no peak, so it is the highest sample).

Only a worker that finished loading is recorded, keyed by model reference,
backend and the settings it ran with: the dtype it reported (else the one
the hive expects it to run), its slots and its context; and whether every
slot was busy at a sample (full load: the peak then covers a full batch,
which a lightly used worker never reached).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rbee.cpus import read_cpu_flags
from rbee.errors import RbeeError
from rbee.fit import PREFIX, fit_facts, worker_context
from rbee_hive.catalog.fits import MeasuredFit, MeasuredFits
from rbee_hive.nvml import Nvml
from rbee_hive.workers.registry import WorkerRecord

log = logging.getLogger(__name__)

SAMPLE_S = 2.0
# A running worker's row is rewritten when its peak grew by this much.
REWRITE_GROWTH = 0.01


def tree_hwm(pids: Iterable[int]) -> int:
    """Sum of VmHWM over ``pids`` (bytes); a process gone meanwhile counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Meter:
    peak: int = 0
    device_peak: int = 0
    # Every slot was busy at a sample (the worker's last report said so).
    full_load: bool = False
    # What the catalog holds from this worker.
    written: int = 0
    written_device: int = 0

    written_full: bool = False

    def grew(self, threshold: float) -> bool:
        return (self.peak > self.written * (1 + threshold) or self.device_peak > self.written_device * (1 + threshold)
                or self.full_load > self.written_full)  # fmt: skip


class PeakRecorder:
    """Follows each worker of a hive; ``sink`` is the model catalog's
    measured fits (set once the provisioning service exists)."""

    def __init__(self, sink: MeasuredFits | None = None, nvml: Nvml | None = None, interval: float = SAMPLE_S) -> None:
        self.sink = sink
        self.nvml = nvml
        self.interval = interval
        self.meters: dict[str, Meter] = {}
        self._expected_dtype: dict[str, str] = {}

    def sample(self, record: WorkerRecord) -> Meter:
        """Read the tree's figures now (blocking: /proc and NVML)."""
        meter = self.meters.setdefault(record.id, Meter())
        if record.process is None:
            return meter
        pids = record.process.alive_tree()
        busy = record.load.slots_busy if record.load is not None else record.slots_total - record.slots_available
        meter.full_load = meter.full_load or (record.ready and record.slots_total > 0 and busy >= record.slots_total)
        meter.peak = max(meter.peak, tree_hwm(pids))
        if record.backend == "cuda" and pids:
            nvml = self.nvml = self.nvml or Nvml()
            used = nvml.process_memory(record.device, set(pids))
            meter.device_peak = max(meter.device_peak, used or 0)
        return meter

    async def sample_now(self, record: WorkerRecord) -> None:
        """One more sample (before the hive stops the worker)."""
        if record.id not in self.meters:
            return  # not followed (never started, or already gone)
        try:
            await asyncio.to_thread(self.sample, record)
        except Exception:  # noqa: BLE001 - measuring never stands in a stop's way
            log.exception("sampling the memory of %s failed", record.id)

    def _dtype(self, record: WorkerRecord) -> str:
        if record.dtype:
            return record.dtype
        if record.model_path not in self._expected_dtype:
            facts = fit_facts(record.model_path, record.backend, read_cpu_flags())
            self._expected_dtype[record.model_path] = facts.get(PREFIX + "dtype", "")
        return self._expected_dtype[record.model_path]

    def measurement(self, record: WorkerRecord) -> MeasuredFit | None:
        """What to record for ``record``, None before it loaded (blocking: reads config.json)."""
        meter = self.meters.get(record.id)
        if meter is None or not meter.peak or not record.ready or not record.slots_total or not record.model_ref:
            return None
        return MeasuredFit(record.model_ref, record.backend, self._dtype(record), record.slots_total,
                           worker_context(Path(record.model_path)), meter.peak, meter.device_peak, full_load=meter.full_load)  # fmt: skip

    def write(self, record: WorkerRecord, threshold: float = REWRITE_GROWTH) -> MeasuredFit | None:
        """Record the worker's peak when it grew past ``threshold`` since the last write (blocking)."""
        meter = self.meters.get(record.id)
        if self.sink is None or meter is None or not meter.grew(threshold):
            return None
        fit = self.measurement(record)
        if fit is None:
            return None
        try:
            stored = self.sink.record(fit)
        except RbeeError as err:
            log.warning("could not record the memory %s measured: %s", record.id, err)
            return None
        meter.written, meter.written_device, meter.written_full = fit.peak_bytes, fit.device_peak_bytes, fit.full_load
        log.info("%s peaked at %d MiB (%s %s, %d slots × %d): recorded", record.id, fit.peak_bytes >> 20, fit.backend,
                 fit.dtype, fit.slots, fit.context)  # fmt: skip
        return stored

    async def follow(self, record: WorkerRecord) -> None:
        """Sample until the worker's process exits, recording as its peak grows, and once at the end."""
        process = record.process
        if process is None:
            return
        try:
            while process.running:
                await asyncio.to_thread(self.sample, record)
                await asyncio.to_thread(self.write, record)
                await process.wait_for_exit(self.interval)  # the period; ends early at the exit
            await asyncio.to_thread(self.write, record, 0.0)
        except Exception:  # noqa: BLE001 - measuring never takes a worker down
            log.exception("measuring the memory of %s failed", record.id)
        finally:
            self.meters.pop(record.id, None)
