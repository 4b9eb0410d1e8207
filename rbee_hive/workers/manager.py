"""Worker lifecycle on one node (S7): preflight, spawn, the ready callback,
exits and stops. The registry holds the workers that have called back; spawns
still waiting for their first callback are kept apart."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rbee.auth import check_key, new_api_key
from rbee.errors import RbeeError, from_status_bytes
from rbee.narration import parse_line
from rbee.v1 import common_pb2, registry_pb2

from rbee_hive.detect import detect
from rbee_hive.logbook import LogBook
from rbee_hive.model_access import ModelAccess
from rbee_hive.preflight import MB, check_worker, estimate_memory, model_size, to_mb
from rbee_hive.resources import ResourceSource
from rbee_hive.settings import HiveSettings
from rbee_hive.workers.binary import WorkerBinaryResolver
from rbee_hive.workers.client import WorkerClient, local_address
from rbee_hive.workers.events import EventLog
from rbee_hive.workers import failures as start_failures
from rbee_hive.workers.failures import LOG_LINES_IN_ERRORS
from rbee_hive.workers.peak import PeakRecorder
from rbee_hive.workers.leftovers import WorkerLedger
from rbee_hive.workers.ports import PortAllocator, port_is_free
from rbee_hive.workers.preparation import LaunchPreparation
from rbee_hive.workers.process import ExitInfo, WorkerProcess
from rbee_hive.workers.registry import READY_STATES, Registry, State, WorkerRecord, state_name
from rbee_hive.workers.spec import SpawnSpec, StopResult, check_spawn_fields
from rbee_hive.workers.stopping import WorkerStopper

# Imported from here by the servicers and start.py.
__all__ = ["SpawnSpec", "StopResult", "WorkerManager", "check_spawn_fields"]

log = logging.getLogger(__name__)

EXIT_PORT_IN_USE = 3
# Worker processes started for one spawn before giving up on port races.
MAX_PORT_RETRIES = 5

Narrate = Callable[..., common_pb2.NarrationEvent]


class WorkerManager:
    def __init__(
        self,
        settings: HiveSettings,
        registry: Registry,
        resources: ResourceSource,
        resolver: WorkerBinaryResolver,
        logbook: LogBook,
        narrate: Narrate,
        callback_address: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.resources = resources
        self.resolver = resolver
        self.logbook = logbook
        self._narrate = narrate
        self._callback_address = callback_address
        self.ports = PortAllocator(settings.worker_host, settings.worker_port_start, settings.worker_port_end)
        # What a spawn may load; the provisioning service adds the catalog.
        self.models = ModelAccess(settings.model_roots)
        self._pending: dict[str, WorkerRecord] = {}
        self._clients: dict[str, WorkerClient] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stops: dict[str, asyncio.Task[StopResult]] = {}
        # Running workers on disk, for the next hive should this one die.
        self.ledger = WorkerLedger(settings.rbee_home / "run")
        # Each worker's peak memory, for the model catalog (the provisioning service sets its sink).
        self.peaks = PeakRecorder()
        self.closing = False
        # Arguments, certificate, cores, temp folder and sandbox of each launch
        # (rbee_hive/workers/preparation.py); its TLS identity and the
        # sandbox's Landlock ABI are the hive's own.
        self.preparation = LaunchPreparation(settings, callback_address)
        self.tls = self.preparation.tls
        self.sandbox_abi = self.preparation.sandbox_abi
        # How one worker is stopped (rbee_hive/workers/stopping.py).
        self.stopper = WorkerStopper(settings, registry, self._pending, self.peaks, self.client, self._say)

    # -- lookups --------------------------------------------------------------
    def find(self, worker_id: str) -> WorkerRecord | None:
        return self.registry.get(worker_id) or self._pending.get(worker_id)

    def require(self, worker_id: str) -> WorkerRecord:
        record = self.find(worker_id)
        if record is None:
            known = [w.id for w in self.registry.all()]
            raise RbeeError(
                "WORKER_NOT_FOUND",
                f"No worker {worker_id!r} on this hive",
                {"worker_id": worker_id, "known": ", ".join(known) or "none"},
                ["List the workers with `rbee-keeper workers list`"],
            )
        return record

    def everything(self) -> list[WorkerRecord]:
        return [*self.registry.all(), *self._pending.values()]

    def client(self, record: WorkerRecord) -> WorkerClient:
        client = self._clients.get(record.id)
        if client is None:
            tls = None
            if self.tls is not None and record.tls_dir is not None:
                tls = self.tls.for_peer(record.tls_name or None)
            client = self._clients[record.id] = WorkerClient(
                local_address(record.host, record.port), record.api_key, record.admin_key, tls
            )
        return client

    # -- narration ------------------------------------------------------------
    def _say(self, record: WorkerRecord | None, emoji: str, message: str, level: str = "info") -> None:
        ev = self._narrate(emoji, message, level)
        if record is not None:
            record.events.narration(ev)

    def _on_output(self, record: WorkerRecord, line: str) -> None:
        self.logbook.write(record.id, line)
        ev = parse_line(line)
        if ev is not None:
            record.events.narration(ev)

    # -- spawn ----------------------------------------------------------------
    async def preflight(self, spec: SpawnSpec, needs_download: bool = False, size: int | None = None):
        """Backend, device, RAM, VRAM (and disk) for a model; raises the first failure."""
        if size is None:
            size = await asyncio.to_thread(model_size, Path(spec.model_path))
        detection = await asyncio.to_thread(detect, self.resources)
        res = await asyncio.to_thread(self.resources.snapshot, self.settings.models_dir)
        memory = await asyncio.to_thread(
            estimate_memory, Path(spec.model_path), spec.backend, size, res.ram_available_bytes, self.settings.worker_dtype
        )
        return check_worker(detection, res, spec.backend, spec.device, size, needs_download, memory), size

    async def spawn(self, spec: SpawnSpec) -> WorkerRecord:
        if self.closing:
            raise RbeeError("UNAVAILABLE", "The hive is shutting down; not starting new workers", suggestions=["Try again once the hive is back"])
        check_spawn_fields(spec)
        backend = spec.backend.strip().lower()
        # Before anything looks at the model: only catalog entries and paths
        # under the model folders (S13), so no preflight walks a client's tree.
        path, ref = await self.models.locate(spec.model_path, spec.model_ref, backend)
        model_path = str(path)
        spec = SpawnSpec(model_path, backend, spec.device, ref, spec.slots, spec.worker_api_key)
        try:
            checks, size = await self.preflight(spec)
        except RbeeError as err:
            self._say(None, "❌", f"Preflight refused {ref} on {spec.backend}:{spec.device}: {err.code}: {err.message}", "error")
            raise
        worker_id = f"worker-{uuid.uuid4().hex[:8]}"
        record = WorkerRecord(
            id=worker_id,
            host=self.settings.worker_host,
            port=0,
            model_ref=ref,
            model_path=model_path,
            backend=spec.backend,
            device=spec.device,
            # Each worker its own key: whoever may use it may use nothing else (S13).
            api_key=spec.worker_api_key or new_api_key(),
            callback_key=new_api_key(),
            log_path=self.logbook.path_for(worker_id),
            events=EventLog(),
        )
        summary = ", ".join(
            (f"{c.name} {to_mb(c.required_bytes)} MB needed, {c.available_bytes // MB} MB available" if c.required_bytes else c.name)
            + (f" ({c.note})" if c.note else "")
            for c in checks
        )
        self._say(record, "✅", f"Preflight passed for {ref} ({size / MB:.0f} MB) on {spec.backend}:{spec.device}: {summary}")
        try:
            program = await self.resolver.resolve(spec.backend, lambda *a, **k: self._say(record, *a, **k))
        except RbeeError as err:
            self._say(record, "❌", f"{err.message}", "error")
            record.events.finish(err)
            raise
        self._pending[worker_id] = record
        try:
            self.preparation.issue_tls(record)
            await self._start_on_some_port(record, program, spec)
        except BaseException as exc:
            err = exc if isinstance(exc, RbeeError) else RbeeError("WORKER_STARTUP_FAILED", f"Spawn of {worker_id} interrupted: {exc!r}")
            await self._abandon(record, err)
            raise
        return record

    async def _start_on_some_port(self, record: WorkerRecord, program: Path, spec: SpawnSpec) -> None:
        tried: list[int] = []
        races = 0
        for port in self.ports.candidates():
            if self.closing or record.stopping:
                raise RbeeError("UNAVAILABLE", "The hive is shutting down; spawn abandoned")
            if not port_is_free(self.settings.worker_host, port):
                tried.append(port)
                self._say(record, "🔁", f"Port {port} is in use, trying port {port + 1}")
                continue
            self.ports.reserve(port)
            record.port = port
            if await self._launch(record, program, spec):
                return
            self.ports.release(port)
            tried.append(port)
            races += 1
            self._say(record, "🔁", f"Port {port} was taken before {record.id} could bind it (PORT_IN_USE), trying port {port + 1}")
            if races >= MAX_PORT_RETRIES:
                break
        raise self.ports.exhausted(tried)

    async def _launch(self, record: WorkerRecord, program: Path, spec: SpawnSpec) -> bool:
        """Start the process on record.port and wait for its first callback.
        False when the port turned out to be taken; raises on any other failure."""
        env = self.preparation.environment(record)
        given = self.preparation.assign_cores(record, env)
        if given is not None:
            self._say(record, "🧮" if given.exclusive else "⚠️", f"{record.id} runs on {given.note}", "info" if given.exclusive else "warn")
        self._say(
            record,
            "🚀",
            f"Starting {program.name} {record.id} for {record.model_ref} on {record.backend}:{record.device}, "
            f"port {record.port} (log: {record.log_path})",
        )
        args = self.preparation.args(record, spec)
        self.logbook.write(record.id, f"# {program} {' '.join(args)}")
        record.called_back.clear()
        process = await WorkerProcess.start(program, args, env, lambda line: self._on_output(record, line))
        record.process = process
        self.ledger.record(record.id, process.pid)
        exited = asyncio.ensure_future(process.wait())
        called = asyncio.ensure_future(record.called_back.wait())
        timeout = self.settings.callback_timeout.total_seconds()
        try:
            done, _ = await asyncio.wait({exited, called}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (exited, called):
                if not fut.done():
                    fut.cancel()
        if called in done and not (exited in done):
            self._watch(record)
            return True
        if exited in done:
            info = exited.result()
            self.ledger.forget(record.id)
            if info.returncode == EXIT_PORT_IN_USE or any("PORT_IN_USE" in line for line in process.tail(5)):
                self.logbook.write(record.id, f"# port {record.port} in use, retrying on the next port")
                return False
            raise self.startup_error(record, info)
        self._say(record, "⏰", f"{record.id} did not call back within {timeout:g}s; stopping it", "error")
        await process.terminate(self.settings.kill_wait.total_seconds(), self.settings.kill_wait.total_seconds())
        self.ledger.forget(record.id)
        raise start_failures.callback_timeout_error(record, timeout)

    async def _abandon(self, record: WorkerRecord, err: RbeeError) -> None:
        record.stopping = True
        self._pending.pop(record.id, None)
        self.registry.remove(record.id)
        if record.process is not None and record.process.running:
            await record.process.kill(self.settings.kill_wait.total_seconds())
        self.ledger.forget(record.id)
        self.preparation.release(record)
        if record.port:
            self.ports.release(record.port)
        self._say(record, "❌", f"Spawn of {record.id} failed: {err.code}: {err.message}", "error")
        record.events.finish(err)
        await self._drop_client(record.id)
        self.logbook.close(record.id)

    # -- errors ---------------------------------------------------------------
    def startup_error(self, record: WorkerRecord, info: ExitInfo) -> RbeeError:
        """Why a worker exited before it was ready (rbee_hive/workers/failures.py)."""
        return start_failures.startup_error(record, info, self.settings.startup_window.total_seconds())

    # -- callbacks ------------------------------------------------------------
    def report(self, request: registry_pb2.ReportWorkerRequest, invocation_metadata: Iterable[tuple[str, Any]] | None) -> None:
        """A worker's ReportWorker: the first one registers it (S6.1)."""
        info = request.worker
        record = self.find(info.id)
        # The key first, and the same answer whether or not the worker exists:
        # a caller without a worker's key learns nothing about which ids do.
        # An unknown id is checked against a fresh random key (never matched).
        auth_error = check_key(invocation_metadata, record.callback_key if record is not None else new_api_key())
        if auth_error is not None:
            if record is None:
                log.warning("callback for unknown worker %r refused", info.id[:64])
            raise auth_error
        assert record is not None
        if info.address and info.address != record.address:
            log.warning("worker %s reports address %s, hive started it on %s", record.id, info.address, record.address)
        if record.id in self._pending and not record.stopping:
            del self._pending[record.id]
            self.registry.add(record)
            self._say(record, "📞", f"{record.id} called back from {record.address} (state {state_name(info.state or State.WORKER_STATE_LOADING)}); registered")
        if info.slots_total:
            record.slots_total = info.slots_total
            record.slots_available = info.slots_available
        if info.HasField("load"):
            record.load = info.load
        if info.dtype:
            record.dtype, record.dtype_reason, record.cpu_threads = info.dtype, info.dtype_reason, info.cpu_threads
        if info.cpu_set:  # the cores the worker found itself on (the hive's assignment, or all of them)
            record.cpu_set = info.cpu_set
        if request.error_status:
            record.failure = from_status_bytes(request.error_status)
        self.set_state(record, info.state or State.WORKER_STATE_LOADING)
        record.called_back.set()

    def set_state(self, record: WorkerRecord, state: int) -> None:
        previous = record.state
        record.state = state
        if state == State.WORKER_STATE_BUSY or previous == State.WORKER_STATE_BUSY:
            record.touch()
        if state in READY_STATES and not record.ready:
            record.ready = True
            record.touch()
            self._say(record, "✅", f"{record.id} is ready on {record.address} ({record.model_ref}, {record.backend}:{record.device})")
            record.events.worker(record.to_proto())
            record.events.finish()
        elif state != previous:
            record.events.worker(record.to_proto())
        if state == State.WORKER_STATE_FAILED and previous != state:
            failure = record.failure
            why = f": {failure.code}: {failure.message}" if failure else ""
            # After loading it is the engine under the worker that failed (e.g. ENGINE_OOM_KILLED).
            what = "its engine failed" if record.ready else "loading failed"
            self._say(record, "❌", f"{record.id} reports that {what}{why}", "error")
            self._spawn_task(self._reap_failed(record))
        self.registry.updated(record)

    async def _reap_failed(self, record: WorkerRecord) -> None:
        """A worker that reported FAILED should exit by itself; make sure it does."""
        if record.process is None:
            return
        wait = self.settings.kill_wait.total_seconds()
        if await record.process.wait_for_exit(wait) is None:
            self._say(record, "🔪", f"{record.id} failed but did not exit within {wait:g}s; stopping it", "warn")
            await record.process.terminate(wait, wait)

    # -- watching -------------------------------------------------------------
    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _watch(self, record: WorkerRecord) -> None:
        self._spawn_task(self._watch_exit(record))
        self._spawn_task(self._relay_progress(record))
        self._spawn_task(self.peaks.follow(record))

    async def _relay_progress(self, record: WorkerRecord) -> None:
        try:
            async for msg in self.client(record).loading_progress():
                if msg.HasField("progress"):
                    record.events.progress(msg.progress)
                if msg.state in READY_STATES:
                    self.set_state(record, msg.state)
                    return
        except RbeeError as err:
            # Exits and FAILED reports carry the story; this is only the progress feed.
            log.info("loading progress of %s ended: %s", record.id, err)

    async def _watch_exit(self, record: WorkerRecord) -> None:
        assert record.process is not None
        info = await record.process.wait()
        self.ledger.forget(record.id)
        self.preparation.release(record)
        self.ports.release(record.port)
        self._pending.pop(record.id, None)
        was_registered = self.registry.remove(record.id) is not None
        await self._drop_client(record.id)
        if record.stopping:
            if not record.events.done:
                record.events.finish(RbeeError("CANCELLED", f"{record.id} was stopped before it finished loading"))
        elif not record.ready:
            err = self.startup_error(record, info)
            self._say(record, "💥", f"{err.message}", "error")
            for line in record.process.tail(LOG_LINES_IN_ERRORS):
                self._narrate("  ", f"{record.id} | {line}", "error")
            record.events.finish(err)
        else:
            what = "was killed by the OOM killer" if info.oom_killed else f"died ({info.describe()})"
            if record.failure is not None and not info.oom_killed:
                what += f" after reporting {record.failure.code}"
            self._say(record, "💀", f"{record.id} {what}; removed from the registry" if was_registered else f"{record.id} {what}", "warn")
        self.logbook.write(record.id, f"# {record.id} {info.describe()} after {info.runtime_s:.1f}s")
        self.logbook.close(record.id)

    async def _drop_client(self, worker_id: str) -> None:
        client = self._clients.pop(worker_id, None)
        if client is not None:
            await client.close()

    # -- stopping -------------------------------------------------------------
    async def stop(self, worker_id: str, grace: float | None = None, reason: str = "requested") -> StopResult:
        """Graceful shutdown, then force-kill after ``grace``; idempotent while running."""
        record = self.require(worker_id)
        running = self._stops.get(worker_id)
        if running is None:
            running = self._stops[worker_id] = asyncio.get_running_loop().create_task(self._stop(record, grace, reason))
            running.add_done_callback(lambda _t: self._stops.pop(worker_id, None))
        return await asyncio.shield(running)

    async def _stop(self, record: WorkerRecord, grace: float | None, reason: str) -> StopResult:
        return await self.stopper.stop(record, grace, reason)

    async def remove_unhealthy(self, record: WorkerRecord, failures: int) -> None:
        await self.stopper.remove_unhealthy(record, failures)

    async def shutdown_all(self) -> list[StopResult]:
        """The SIGTERM cascade: every worker told to stop in parallel, each waited
        for up to the grace, the rest force-killed; the registry cleared."""
        self.closing = True
        records = self.everything()
        grace = self.settings.shutdown_grace.total_seconds()
        if not records:
            self._narrate("✅", "No workers to stop")
            self.registry.clear()
            return []
        self._narrate("🛑", f"Shutting down {len(records)} worker(s): {', '.join(r.id for r in records)}")
        self._narrate("⏳", f"Waiting up to {grace:g}s for each worker to exit")
        results = await asyncio.gather(*(self.stop(r.id, grace, "hive shutting down") for r in records), return_exceptions=True)
        done = [r for r in results if isinstance(r, StopResult)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, RbeeError):
                log.error("stopping a worker failed: %r", r)
        self.registry.clear()
        self._pending.clear()
        forced = sum(1 for r in done if r.force_killed)
        self._narrate("✅", f"All workers terminated ({forced} force-killed); registry cleared")
        return done

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for worker_id in list(self._clients):
            await self._drop_client(worker_id)
