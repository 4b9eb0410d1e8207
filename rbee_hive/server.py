"""The hive daemon: one gRPC server with health, preflight, workers and the
workers' callback; supervision; graceful SIGTERM (the worker cascade, S8)."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import signal

import grpc
from grpc_health.v1 import _async as health, health_pb2, health_pb2_grpc

from rbee.auth import KeyRing, ScopedKeyInterceptor
from rbee.client_version import ClientVersionInterceptor
from rbee.channel import SERVER_OPTIONS, bind_port
from rbee.errors import RbeeError
from rbee.rpc import RequestGuard, set_log_location
from rbee.scopes import Scope
from rbee.tls import is_loopback
from rbee.v1 import preflight_pb2_grpc, registry_pb2_grpc

from rbee_hive.context import HiveContext, build_context
from rbee_hive.logbook import HIVE_SOURCE, LogBookHandler
from rbee_hive.servicers.callback import WorkerCallbackServicer
from rbee_hive.servicers.preflight import PreflightServicer
from rbee_hive.servicers.provisioning import add_provisioning_service
from rbee_hive.servicers.workers import HiveWorkerServicer
from rbee_hive.settings import HiveSettings
from rbee_hive.workers.environment import is_secret
from rbee_hive.workers.sandbox import describe, scrub_environ_block

log = logging.getLogger(__name__)

SERVER_STOP_GRACE_S = 5.0


def add_core_services(server: grpc.aio.Server, ctx: HiveContext) -> None:
    preflight_pb2_grpc.add_PreflightServiceServicer_to_server(PreflightServicer(ctx), server)
    registry_pb2_grpc.add_HiveWorkerServiceServicer_to_server(HiveWorkerServicer(ctx), server)
    registry_pb2_grpc.add_WorkerCallbackServiceServicer_to_server(WorkerCallbackServicer(ctx.manager), server)


def add_extra_services(server: grpc.aio.Server, ctx: HiveContext) -> None:
    """Services beyond the core ones (e.g. provisioning): one line each here."""
    add_provisioning_service(server, ctx)


def hive_key_ring(admin_key: str, ctx: HiveContext) -> KeyRing:
    """The hive's keys by scope (S13): its own admin key, then each worker's
    callback key (the servicer checks it is that worker's), and the keys it
    holds for its workers (inference, their admin), which open nothing here."""

    def ring():
        yield Scope.ADMIN, admin_key
        for record in ctx.manager.everything():
            yield Scope.CALLBACK, record.callback_key
            yield Scope.INFERENCE, record.api_key
            yield Scope.OTHER_ADMIN, record.admin_key

    return ring


def callback_host(bind_host: str) -> str:
    """Where a local worker reaches the hive: a wildcard bind is reached on loopback."""
    if bind_host in ("0.0.0.0", "", "[::]", "::"):
        return "127.0.0.1"
    return bind_host


class HiveServer:
    def __init__(self, ctx: HiveContext) -> None:
        self.ctx = ctx
        self.port = 0
        self._health = health.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        settings = self.ctx.settings
        key = settings.api_key_value()
        if not key:
            raise RbeeError(
                "MISSING_API_KEY",
                "rbee-hive needs an API key to serve",
                {"setting": "api_key"},
                ["Pass --api-key KEY, or set RBEE_HIVE_API_KEY, or api_key in the [hive] config section"],
            )
        server = grpc.aio.server(
            interceptors=[ScopedKeyInterceptor(hive_key_ring(key, self.ctx)),
                          ClientVersionInterceptor("rbee-hive", settings.min_keeper_version), RequestGuard()],
            options=SERVER_OPTIONS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        add_core_services(server, self.ctx)
        add_extra_services(server, self.ctx)
        address = f"{settings.host}:{settings.port}"
        self.port = bind_port(server, address, "rbee-hive", self.ctx.manager.tls, settings.insecure)
        if self.ctx.manager.tls is None and not is_loopback(settings.host):
            self.ctx.narrate("⚠️", f"Listening on {settings.host} without TLS (--insecure): keys and tokens cross the network in clear", "warn")
        # What a worker's code can reach of this hive, said plainly (docs/security.md).
        blanked = scrub_environ_block(is_secret)
        self.ctx.narrate("🛡️", describe(self.ctx.manager.sandbox_abi, getpass.getuser())
                         + (f" (blanked from /proc/{os.getpid()}/environ: {', '.join(blanked)})" if blanked else ""),
                         "info" if self.ctx.manager.sandbox_abi > 0 else "warn")  # fmt: skip
        # Bound, so this is the hive of this port: stop what a hive that died left.
        self.ctx.manager.ledger.reap(self.ctx.narrate)
        host = callback_host(settings.host)
        self.ctx.callback_address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        await server.start()
        self._server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.ctx.supervisor.start()
        return self.port

    async def stop(self) -> int:
        """Graceful stop: refuse new spawns, stop every worker, then the server."""
        ctx = self.ctx
        ctx.status = "shutting_down"
        await self._health.enter_graceful_shutdown()
        await ctx.supervisor.stop()
        results = await ctx.manager.shutdown_all()
        await ctx.manager.close()
        if self._server is not None:
            await self._server.stop(SERVER_STOP_GRACE_S)
        ctx.narrate("👋", "rbee-hive stopped")
        ctx.logbook.close_all()
        return len(results)


STDOUT_LOG_CHECK_S = 5.0


async def rotate_stdout_log(settings: HiveSettings, every_s: float = STDOUT_LOG_CHECK_S) -> None:
    """Keep the file the hive's own output is redirected into (the queen's
    logs/hive.log) under log_max_bytes, as the logs the hive writes itself."""
    from rbee.logfiles import RedirectedLog

    log = RedirectedLog(settings.stdout_log, settings.log_max_bytes, settings.log_backups)
    while True:
        await asyncio.sleep(every_s)
        log.rotate_if_due()


async def serve(settings: HiveSettings) -> int:
    ctx = build_context(settings)
    set_log_location(str(ctx.logbook.path_for(HIVE_SOURCE)))
    handler = LogBookHandler(ctx.logbook)
    logging.getLogger().addHandler(handler)
    server = HiveServer(ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if len(received) == 1:
            stop.set()
        else:
            ctx.narrate("⏳", f"{sig.name} again: still stopping workers (bounded by the shutdown grace)")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        port = await server.start()
        ctx.narrate(
            "🐝",
            f"rbee-hive {ctx.version} (API {ctx.api_version}) listening on {settings.host}:{port} "
            f"({'mutual TLS' if ctx.manager.tls else 'plain gRPC'}); "
            f"worker ports {settings.worker_port_start}-{settings.worker_port_end}; logs in {settings.logs_dir}",
        )
        if settings.resource_overrides:
            ctx.narrate("⚠️", f"Resource figures overridden by {settings.resource_overrides}", "warn")
        rotator = asyncio.ensure_future(rotate_stdout_log(settings)) if settings.stdout_log else None
        await stop.wait()
        if rotator is not None:
            rotator.cancel()
        ctx.narrate("🛑", f"{received[0]} received: shutting down")
        await server.stop()
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logging.getLogger().removeHandler(handler)
