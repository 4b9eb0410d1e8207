"""keeper's client for a worker's InferenceService."""

from __future__ import annotations

import grpc

from rbee.errors import RbeeError, from_rpc_error
from rbee.v1 import inference_pb2, inference_pb2_grpc

from rbee_keeper.daemon_client import CONNECT_ATTEMPT_TIMEOUT_S, DaemonClient


class WorkerClient(DaemonClient):
    what = "the worker"

    def _bind(self, channel) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def __aenter__(self) -> "WorkerClient":
        # The first readiness query connects: with --connect-timeout it waits
        # for a worker whose server is still starting instead of retrying.
        return self

    def unreachable_hints(self) -> list[str]:
        return [
            f"Check that llm-worker-rbee is running and listening on {self.address}",
            "Check the host and port given with --worker",
        ]

    async def readiness(self, timeout: float = 10.0, wait_for_ready: bool = False) -> inference_pb2.GetReadinessResponse:
        if not wait_for_ready:
            await self.ensure_connected(min(timeout, CONNECT_ATTEMPT_TIMEOUT_S))
        try:
            return await self._stub.GetReadiness(
                inference_pb2.GetReadinessRequest(),
                metadata=self._md,
                timeout=timeout,
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as err:
            raise self._unreachable_or(err, timeout, wait_for_ready) from None

    def loading_progress(self) -> grpc.aio.UnaryStreamCall:
        return self._stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=self._md)

    def generate(self, request: inference_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        return self._stub.Generate(request, metadata=self._md)

    async def cancel(self, request_id: str, timeout: float) -> inference_pb2.CancelResponse:
        return await self._unary(self._stub.Cancel, inference_pb2.CancelRequest(request_id=request_id), timeout)

    async def shutdown(self, drain_timeout_ms: int = 0, timeout: float = 10.0) -> inference_pb2.ShutdownResponse:
        request = inference_pb2.ShutdownRequest(drain_timeout_ms=drain_timeout_ms)
        return await self._unary(self._stub.Shutdown, request, timeout)

    def _unreachable_or(self, err: grpc.RpcError, timeout: float, waited: bool) -> RbeeError:
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            rbee_err = from_rpc_error(err, self.address)
            if "grpc_status" in rbee_err.details:  # no rbee details: nothing answered
                how = f"within {timeout:g}s" if waited else ""
                return RbeeError(
                    "WORKER_UNREACHABLE",
                    f"Cannot reach the worker at {self.address} {how}".rstrip(),
                    {"worker": self.address, "grpc_status": code.name},
                    self.unreachable_hints(),
                )
        return self.error(err)
