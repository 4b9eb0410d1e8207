"""The queen daemon: one gRPC server with health and the node registry; its
log in $RBEE_HOME/logs/queen.log; on SIGTERM it stops the hives it started
(and only those: a hive it found running is left alone), then exits 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import TextIO

import grpc
from grpc_health.v1 import _async as health, health_pb2, health_pb2_grpc

from rbee.auth import KeyRing, ScopedKeyInterceptor
from rbee.client_version import ClientVersionInterceptor
from rbee.channel import SERVER_OPTIONS, bind_port
from rbee.config import API_VERSION, VERSION, remote_settings
from rbee.logfiles import RotatingFile
from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.rpc import RequestGuard, set_log_location
from rbee.scopes import Scope
from rbee.v1 import keys_pb2_grpc, nodes_pb2_grpc, replicas_pb2_grpc, tasks_pb2_grpc

from rbee.tls import ClusterCA, is_loopback
from rbee_queen.admission import AdmissionQueue
from rbee_queen.appkeys import AppKeyStore
from rbee_queen.enrol import start_enrolment
from rbee_queen.hives import cluster_ca, stop_hive, use_cluster_ca
from rbee_queen.nodes.manager import NodeManager
from rbee_queen.nodes.relay import ACTOR, NodeEventRelay
from rbee_queen.nodes.store import NodeStore
from rbee_queen.reconcile import Reconciler, ReplicaPolicy
from rbee_queen.deployments import DeploymentStore
from rbee_queen.servicers.keys import AppKeyServicer
from rbee_queen.servicers.replicas import ReplicaServicer
from rbee_queen.servicers.nodes import NodeServicer
from rbee_queen.servicers.tasks import ClusterWorkerServicer, TaskServicer
from rbee_queen.eviction import Evictor, hive_sleeper, hive_stopper
from rbee_queen.keepalive import KeepAlive
from rbee_queen.survey import same_model
from rbee_queen.tasks import TaskRunner
from rbee_queen.workers import ClusterWorkers, HiveWatchers
from rbee_queen.settings import QueenSettings

log = logging.getLogger(__name__)
SERVER_STOP_GRACE_S = 5.0


class _Tee:
    """Narration to the terminal and to queen.log."""

    def __init__(self, *streams: TextIO) -> None:
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            try:
                stream.write(text)
            except (OSError, ValueError):
                pass
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def queen_key_ring(admin_key: str, store: NodeStore) -> KeyRing:
    """The queen's key opens everything it serves (S13: whoever may submit a
    task may start workers). The nodes' hive keys it keeps are named as what
    they are when presented here; they are read only for a key that is not
    the queen's."""

    def ring():
        yield Scope.ADMIN, admin_key
        try:
            nodes = store.list()
        except RbeeError:
            return
        for node in nodes:
            yield Scope.OTHER_ADMIN, node.hive_key

    return ring


class QueenServer:
    def __init__(self, settings: QueenSettings, narrator: Narrator) -> None:
        self.settings = settings
        self.narrate = narrator
        self.store = NodeStore(settings.db_path, remote_settings().hive_program)
        # Keys for applications on the HTTP API (same beehives.db); verify() is the HTTP auth's verifier.
        self.app_keys = AppKeyStore(settings.db_path)
        self._flusher: asyncio.Task | None = None
        # The cluster's certificate authority (S13): $RBEE_HOME/tls, created on first use.
        use_cluster_ca(ClusterCA(settings.rbee_home))
        self.nodes = NodeManager(settings, self.store, narrator)
        self.registry = ClusterWorkers(settings.worker_stale_after.total_seconds())
        self.watchers = HiveWatchers(self.store, self.registry, narrator)
        # Requests waiting for a busy model's slot (rbee_queen/admission.py), task API and front door alike.
        self.queue = AdmissionQueue(settings.queue_length, settings.queue_wait.total_seconds(), self.registry.listen)
        self.tasks = TaskRunner(self.store, self.nodes, self.watchers, queue=self.queue)
        # Idle memory (docs/queen.md): each worker's keep-alive, and room made by evicting idle workers.
        self.keepalive = KeepAlive(settings.keep_alive, self.registry, hive_stopper(self.store), narrator,
                                   sleep=hive_sleeper(self.store) if settings.idle_sleep else None)  # fmt: skip
        self.tasks.keepalive = self.keepalive
        self.tasks.evictor = Evictor(self.store, self.keepalive)
        # Models kept running (docs/queen.md, "Replicas"): the wish in beehives.db, the loop that keeps it.
        self.deployments = DeploymentStore(settings.db_path)
        self.replicas = Reconciler(self.deployments, self.store, self.tasks, self.registry, self.watchers, narrator,
                                   ReplicaPolicy(settings.replica_interval.total_seconds(), settings.replica_backoff_base.total_seconds(),
                                                 settings.replica_backoff_max.total_seconds()))  # fmt: skip
        # A deployed model's workers count for its replicas: keep-alive and eviction leave them be.
        self.keepalive.needed = lambda node, w: any(same_model(d.model_ref, w.model_ref) for d in self.deployments.list())
        self.port = 0
        self._health = health.HealthServicer()
        self._server: grpc.aio.Server | None = None
        # The enrolment port (queen port + 1) beside a TLS queen (rbee_queen/enrol.py).
        self._enrol: grpc.aio.Server | None = None
        # The OpenAI-compatible HTTP front door (rbee_queen/http), when http_port is set.
        self.http = None

    async def start(self) -> int:
        s = self.settings
        key, source = s.api_key_value()
        serve_tls = not is_loopback(s.host) and not s.insecure
        server = grpc.aio.server(interceptors=[ScopedKeyInterceptor(queen_key_ring(key, self.store)), ClientVersionInterceptor("queen-rbee", s.min_keeper_version),
                                                 RequestGuard()], options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        nodes_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(self.nodes, self.narrate, self.watchers), server)
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(self.tasks, self.narrate), server)
        tasks_pb2_grpc.add_ClusterWorkerServiceServicer_to_server(ClusterWorkerServicer(self.registry), server)
        keys_pb2_grpc.add_AppKeyServiceServicer_to_server(AppKeyServicer(self.app_keys, self.narrate), server)
        replicas_pb2_grpc.add_ReplicaServiceServicer_to_server(ReplicaServicer(self.replicas), server)
        address = f"{s.host}:{s.port}"
        tls = None
        if serve_tls:
            hosts = [s.host, socket.gethostname()]
            # Beyond loopback the queen serves mutual TLS with its own CA.
            tls = await asyncio.to_thread(cluster_ca().server_identity, "queen-rbee", hosts)
        self.port = bind_port(server, address, "queen-rbee", tls, s.insecure)
        if tls is not None:
            self.narrate("🔐", f"Serving mutual TLS: clients need a certificate of the cluster CA ({cluster_ca().ca_path})")
        elif not is_loopback(s.host):
            self.narrate("⚠️", f"Listening on {s.host} without TLS (--insecure): keys cross the network in clear", "warn")
        await server.start()
        self._server = server
        from rbee_queen.http.listener import start_front_door

        try:
            if tls is not None:
                self._enrol = await start_enrolment(s.host, self.port, tls, cluster_ca(), self.narrate)
            self.narrate("🔑", f"API key from {source}")
            # The HTTP port before health says SERVING: a queen that cannot
            # serve it (PORT_IN_USE) never looks ready and leaves nothing behind.
            self.http = await start_front_door(self)
        except BaseException:
            if self._enrol is not None:
                await self._enrol.stop(None)
                self._enrol = None
            await server.stop(None)
            self._server = None
            raise
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        # Rebuild the worker registry from every registered node's hive.
        self.watchers.start()
        self.keepalive.start()
        self.replicas.start()
        self._flusher = asyncio.ensure_future(self.app_keys.keep_last_used())
        return self.port

    async def stop(self) -> None:
        """Stop the hives this queen started (each stops its workers), then the server."""
        await self._health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
            await self.http.app.state.router.close()
        await self.replicas.close()
        await self.keepalive.close()
        await self.watchers.close()
        relay = NodeEventRelay(self.narrate)
        for name, pid in list(self.nodes.started_hives.items()):
            try:
                record = self.store.get(name)
                transport = self.nodes.transport(record, relay)
                await transport.connect()
                try:
                    self.narrate("🛑", f"Stopping the hive this queen started on {name} (pid {pid})")
                    gone = await stop_hive(transport, pid)
                    self.narrate("✅" if gone else "⚠️", f"Hive on {name} {'stopped' if gone else 'did not stop in time'}")
                finally:
                    await transport.close()
            except RbeeError as err:
                self.narrate("⚠️", f"Could not stop the hive on {name}: {err.code}: {err.message}", "warn")
            self.nodes.started_hives.pop(name, None)
        if self._enrol is not None:
            await self._enrol.stop(None)
        if self._server is not None:
            await self._server.stop(SERVER_STOP_GRACE_S)
        if self._flusher is not None:
            self._flusher.cancel()
        self.app_keys.close()
        self.deployments.close()
        self.store.close()
        self.narrate("👋", "queen-rbee stopped")


async def serve(settings: QueenSettings) -> int:
    os.umask(0o077)  # catalogs, keys, logs and known_hosts: the queen's user only
    settings.rbee_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.rbee_home, 0o700)
    settings.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Rotated at 64 MiB, two old files kept (rbee/logfiles.py); lives as long as the daemon.
    log_file = RotatingFile(settings.logs_dir / "queen.log")
    set_log_location(str(settings.logs_dir / "queen.log"))
    narrator = Narrator(ACTOR, _Tee(sys.stdout, log_file))
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if len(received) == 1:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    server: QueenServer | None = None
    try:
        server = QueenServer(settings, narrator)
        port = await server.start()
        narrator("👑", f"queen-rbee {VERSION} (API {API_VERSION}) listening on {settings.host}:{port}; "
                 f"nodes in {settings.db_path}; log {settings.logs_dir / 'queen.log'}")  # fmt: skip
        await stop.wait()
        narrator("🛑", f"{received[0]} received: shutting down")
        await server.stop()
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logging.getLogger().removeHandler(handler)
        log_file.close()
