"""Assembling the worker's gRPC server: servicer, health, auth.

Shared by the program, the unit tests and the transport benchmark, so that
what is tested and measured is what runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from rbee.auth import ScopedKeyInterceptor, static_ring
from rbee.bounds import worker_receive_limit
from rbee.channel import bind_port, server_options
from rbee.errors import RbeeError
from rbee.rpc import RequestGuard
from rbee.scopes import Scope
from rbee.tls import TlsIdentity
from rbee.v1 import inference_pb2, inference_pb2_grpc
from rbee_worker.servicer import InferenceServicer
from rbee_worker.status import BUSY, IDLE, WorkerStatus

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

@dataclass
class WorkerServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer


def port_in_use(host: str, port: int) -> RbeeError:
    return RbeeError(
        "PORT_IN_USE",
        f"port {port} is in use",
        {"host": host, "port": port},
        ["Pick another --port (the hive tries the next one by itself)"],
    )


def health_follows(status: WorkerStatus, health: health_aio.HealthServicer) -> None:
    """SERVING while the model is loaded and requests are accepted; only
    real flips are sent, so idle ⇄ busy costs nothing."""
    current = {"serving": False}

    def on_state(state: int) -> None:
        serving = state in (IDLE, BUSY)
        if serving == current["serving"]:
            return
        current["serving"] = serving
        value = SERVING if serving else NOT_SERVING
        loop = asyncio.get_running_loop()
        for name in ("", SERVICE_NAME):
            loop.create_task(health.set(name, value))

    status.on_state(on_state)


async def create_server(
    servicer: InferenceServicer,
    status: WorkerStatus,
    api_key: str,
    host: str = "127.0.0.1",
    port: int = 0,
    admin_key: str | None = None,
    callback_key: str | None = None,
    tls: TlsIdentity | None = None,
    insecure: bool = False,
    max_model_len: int | None = None,
) -> WorkerServer:
    """Bind and start; raises RbeeError(PORT_IN_USE) when the port is taken.

    ``api_key`` opens inference (rbee/scopes.py); ``admin_key`` opens Shutdown.
    A hive passes a separate admin key it alone holds; a worker started by hand
    without one takes its inference key for both (its operator holds it anyway).
    The callback key (for the hive) opens nothing here. With ``tls`` the port
    speaks mutual TLS; without it a host beyond loopback needs ``insecure``.
    grpc refuses a message larger than the largest valid request for a
    context of ``max_model_len`` tokens (rbee/bounds.py) before reading it."""
    ring = static_ring(
        (Scope.INFERENCE, api_key), (Scope.ADMIN, admin_key or api_key), (Scope.CALLBACK, callback_key or "")
    )
    server = grpc.aio.server(
        interceptors=[ScopedKeyInterceptor(ring), RequestGuard()],
        options=server_options(worker_receive_limit(max_model_len)),
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health.set(name, NOT_SERVING)
    health_follows(status, health)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = bind_port(server, address, "llm-worker-rbee", tls, insecure, in_use=lambda: port_in_use(host, port))
    await server.start()
    return WorkerServer(server=server, port=bound, health=health)
