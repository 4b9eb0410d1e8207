"""keeper's client for a hive's HiveWorkerService and PreflightService: one
channel, the API key on every call, failures as RbeeError naming the hive and
where the key came from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from rbee.channel import metadata, open_channel
from rbee.errors import RbeeError, from_rpc_error
from rbee.v1 import preflight_pb2, preflight_pb2_grpc, registry_pb2, registry_pb2_grpc

from rbee_keeper.common import explain_auth

CALL_TIMEOUT_S = 30.0


def parse_hive_address(address: str) -> str:
    """``host:port`` with a port in 1..65535."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"--hive must be HOST:PORT (got {address!r})",
            {"option": "--hive", "value": address},
            ["Give the hive as HOST:PORT, e.g. --hive 127.0.0.1:7900"],
        )
    return f"{host}:{int(port)}"


class HiveClient:
    def __init__(self, address: str, api_key: str, key_source: str) -> None:
        self.address = address
        self.key_source = key_source
        self._channel = open_channel(address)
        self._workers = registry_pb2_grpc.HiveWorkerServiceStub(self._channel)
        self._preflight = preflight_pb2_grpc.PreflightServiceStub(self._channel)
        self._md = metadata(api_key)

    async def __aenter__(self) -> "HiveClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close(grace=None)

    def error(self, err: grpc.RpcError) -> RbeeError:
        rbee_err = from_rpc_error(err, self.address)
        if rbee_err.code == "UNAVAILABLE" and "grpc_status" in rbee_err.details:
            rbee_err = RbeeError(
                "HIVE_UNREACHABLE",
                f"Cannot reach the hive at {self.address}",
                {"hive": self.address},
                [f"Check that rbee-hive is running there (rbee-hive daemon --port {self.address.rpartition(':')[2]})"],
            )
        return explain_auth(rbee_err, self.address, self.key_source)

    async def _unary(self, method: Any, request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        try:
            return await method(request, metadata=self._md, timeout=timeout)
        except grpc.RpcError as err:
            raise self.error(err) from None

    async def spawn(self, request: registry_pb2.SpawnWorkerRequest, timeout: float) -> registry_pb2.SpawnWorkerResponse:
        return await self._unary(self._workers.SpawnWorker, request, timeout)

    async def follow(self, worker_id: str) -> AsyncIterator[registry_pb2.FollowWorkerResponse]:
        call = self._workers.FollowWorker(registry_pb2.FollowWorkerRequest(worker_id=worker_id), metadata=self._md)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise self.error(err) from None
        finally:
            call.cancel()

    async def list(self, model_ref: str = "", state: int = 0) -> list:
        reply = await self._unary(self._workers.ListWorkers, registry_pb2.ListWorkersRequest(model_ref=model_ref, state=state))
        return list(reply.workers)

    async def health(self, worker_id: str = "") -> list:
        reply = await self._unary(
            self._workers.CheckWorkersHealth, registry_pb2.CheckWorkersHealthRequest(worker_id=worker_id), 60.0
        )
        return list(reply.workers)

    async def shutdown(self, worker_id: str, timeout_s: int = 0) -> registry_pb2.ShutdownWorkerResponse:
        request = registry_pb2.ShutdownWorkerRequest(worker_id=worker_id, timeout_s=timeout_s)
        return await self._unary(self._workers.ShutdownWorker, request, (timeout_s or 30) + 30.0)

    async def hive_health(self) -> preflight_pb2.GetHiveHealthResponse:
        return await self._unary(self._preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())

    async def logs(self, worker_id: str = "", tail_lines: int = 0, follow: bool = False) -> AsyncIterator[registry_pb2.StreamLogsResponse]:
        request = registry_pb2.StreamLogsRequest(worker_id=worker_id, tail_lines=tail_lines, follow=follow)
        call = self._workers.StreamLogs(request, metadata=self._md)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise self.error(err) from None
        finally:
            call.cancel()
