"""uvicorn inside the queen: the HTTP front door shares the queen's process
and event loop with its gRPC server.

Loopback by default. Beyond loopback only with TLS: a certificate the
operator gives (``--http-cert``/``--http-key``, what browsers trust) or one
of the cluster CA's, unless ``--insecure``. The port is bound here, before
uvicorn runs, so a taken port is PORT_IN_USE naming ``--http-port``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from rbee.errors import RbeeError
from rbee.tls import is_loopback
from rbee_queen.http.guard import http_protocol

log = logging.getLogger(__name__)
STOP_GRACE_S = 5
# An idle keep-alive connection is closed after this long. Longer than
# uvicorn's 5 s: a client that reuses a connection the server is closing at
# that moment sees a reset, and clients pause longer than 5 s between requests.
KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    """The queen handles SIGTERM/SIGINT itself; uvicorn must not take them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_http(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RbeeError(
            "PORT_IN_USE",
            f"queen-rbee cannot serve HTTP on {host}:{port}: {exc.strerror or exc}",
            {"address": f"{host}:{port}", "setting": "http_port"},
            ["Pick another port with --http-port PORT (RBEE_QUEEN_HTTP_PORT)", "Or turn HTTP off with --http-port 0"],
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def cluster_ca_files(ca: Any, tls_dir: Path, hosts: list[str]) -> tuple[Path, Path]:
    """A server certificate of the cluster CA for the HTTP port, written
    where uvicorn can load it (the key 0600)."""
    identity = ca.server_identity("queen-rbee http", hosts)
    cert, key = tls_dir / "http-cert.pem", tls_dir / "http-key.pem"
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(key, identity.key or b"", 0o600)
    _write(cert, identity.cert or b"", 0o644)
    return cert, key


class HttpServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = 0
        self.scheme = "http"
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int, cert: Path | None = None, key: Path | None = None) -> int:
        sock = bind_http(host, port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
            ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None,
            timeout_graceful_shutdown=STOP_GRACE_S, loop="none", timeout_keep_alive=KEEP_ALIVE_S,
            http=http_protocol(),  # a request's head bounded (guard.py)
        )  # fmt: skip
        self.scheme = "https" if cert else "http"
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RbeeError("INTERNAL", "The HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, STOP_GRACE_S + 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping anyway
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def tls_files(host: str, insecure: bool, cert: Path | None, key: Path | None, ca: Any, tls_dir: Path) -> tuple[Path | None, Path | None]:
    """Which certificate the HTTP port serves, or none (loopback or --insecure)."""
    if bool(cert) != bool(key):
        raise RbeeError("INVALID_CONFIG", "--http-cert and --http-key go together", {"setting": "http_cert"},
                        ["Pass both --http-cert FILE and --http-key FILE"])  # fmt: skip
    if cert and key:
        for path in (cert, key):
            if not Path(path).expanduser().is_file():
                raise RbeeError("TLS_FILE_INVALID", f"Cannot read {path}", {"path": str(path)},
                                ["Check the path given to --http-cert/--http-key"])  # fmt: skip
        return Path(cert).expanduser(), Path(key).expanduser()
    if is_loopback(host) or insecure:
        return None, None
    return cluster_ca_files(ca, tls_dir, [host, socket.gethostname()])



def install_metrics(app: Any, router: Any, queen: Any, public: bool) -> None:
    """GET /metrics over the queen's registry, nodes and router; the proxy
    and the router report to it."""
    from rbee_queen.http.metrics import ClusterCollector, QueenMetrics, metrics_router

    def nodes() -> list[str]:
        try:
            return [r.name for r in queen.store.list()]
        except RbeeError:
            return []

    collector = ClusterCollector(queen.registry.list, nodes, queen.registry.heard_from, router.load, router.queue.depths)
    metrics = QueenMetrics(collector, router.models.loaded)
    app.state.metrics = metrics
    app.state.observer = metrics.proxy_observer()
    router.observers.append(metrics.observer())
    app.include_router(metrics_router(metrics, public))


async def start_front_door(queen: Any) -> HttpServer | None:
    """The queen's HTTP front door on ``http_port`` (None when it is 0):
    the app with its router over the queen's registry and task flow."""
    from rbee_queen.hives import cluster_ca
    from rbee_queen.http.asgi import create_app
    from rbee_queen.http.auth import Authenticator
    from rbee_queen.http.routing import Router

    s = queen.settings
    if not s.http_port:
        return None
    host = s.http_host or s.host
    cert, key = await asyncio.to_thread(tls_files, host, s.insecure, s.http_cert, s.http_key, cluster_ca(), s.rbee_home / "tls")
    admin, _source = s.api_key_value()
    router = Router(queen.store, queen.registry, queen.tasks, queen.narrate, s.http_cold_start_wait.total_seconds())
    # Keys made with `rbee-keeper keys create` open the API beside the queen's own.
    app = create_app(Authenticator(admin, queen.app_keys.verify), router, queen)
    install_metrics(app, router, queen, s.metrics_public)
    server = HttpServer(app)
    port = await server.start(host, s.http_port, cert, key)
    shown = f"[{host}]" if ":" in host else host
    queen.narrate("🌐", f"OpenAI-compatible API on {server.scheme}://{shown}:{port}/v1")
    if cert is None and not is_loopback(host):
        queen.narrate("⚠️", f"HTTP on {host} without TLS (--insecure): keys cross the network in clear", "warn")
    return server
