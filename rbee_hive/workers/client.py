"""The hive's calls to its workers: health, readiness, loading progress, sleep, shutdown."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.channel import metadata, open_channel
from rbee.errors import from_rpc_error
from rbee.tls import TlsIdentity, is_wildcard
from rbee.v1 import inference_pb2, inference_pb2_grpc


@dataclass(frozen=True)
class HealthResult:
    reachable: bool
    status: str
    latency_ms: int


def local_address(host: str, port: int) -> str:
    """Where the hive reaches a worker of its own: a wildcard bind on loopback
    (an address its certificate names)."""
    if is_wildcard(host):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WorkerClient:
    def __init__(self, address: str, api_key: str, admin_key: str | None = None, tls: TlsIdentity | None = None) -> None:
        self.address = address
        self._channel = open_channel(address, tls)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._md = metadata(api_key)
        # Shutdown is the worker's admin scope (rbee/scopes.py).
        self._admin_md = metadata(admin_key or api_key)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def health(self, timeout: float) -> HealthResult:
        """Any answer (SERVING, or NOT_SERVING while loading) means alive."""
        started = time.monotonic()
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if callable(getattr(err, "code", None)) else None
            return HealthResult(False, code.name if code else "ERROR", int((time.monotonic() - started) * 1000))
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return HealthResult(True, status, int((time.monotonic() - started) * 1000))

    async def readiness(self, timeout: float) -> inference_pb2.GetReadinessResponse:
        try:
            return await self._stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=self._md, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None

    async def loading_progress(self) -> AsyncIterator[inference_pb2.StreamLoadingProgressResponse]:
        call = self._stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=self._md)
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None
        finally:
            call.cancel()

    async def sleep(self, timeout: float) -> inference_pb2.SleepResponse:
        """The worker's Sleep (level 1); its errors as they are (SLEEP_MODE_UNSUPPORTED, WORKER_BUSY, ...)."""
        try:
            return await self._stub.Sleep(inference_pb2.SleepRequest(level=1), metadata=self._admin_md, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None

    async def shutdown(self, drain_timeout_ms: int, timeout: float) -> None:
        try:
            await self._stub.Shutdown(
                inference_pb2.ShutdownRequest(drain_timeout_ms=drain_timeout_ms), metadata=self._admin_md, timeout=timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None

