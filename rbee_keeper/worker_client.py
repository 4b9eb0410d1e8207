"""keeper's client for a worker's InferenceService: one channel, the API key
on every call, and failures turned into RbeeError that name the worker and
where the key came from."""

from __future__ import annotations

import grpc

from rbee.channel import metadata, open_channel
from rbee.errors import RbeeError, from_rpc_error
from rbee.v1 import inference_pb2, inference_pb2_grpc

from rbee_keeper.common import explain_auth


class WorkerClient:
    def __init__(self, address: str, api_key: str, key_source: str) -> None:
        self.address = address
        self.key_source = key_source
        self._channel = open_channel(address)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._metadata = metadata(api_key)

    async def __aenter__(self) -> "WorkerClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    def error(self, err: grpc.RpcError) -> RbeeError:
        """The RbeeError behind a failed call, with auth failures explained."""
        return explain_auth(from_rpc_error(err, self.address), self.address, self.key_source)

    async def readiness(self, timeout: float = 10.0, wait_for_ready: bool = False) -> inference_pb2.GetReadinessResponse:
        try:
            return await self._stub.GetReadiness(
                inference_pb2.GetReadinessRequest(),
                metadata=self._metadata,
                timeout=timeout,
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as err:
            raise self._unreachable_or(err, timeout, wait_for_ready) from None

    def loading_progress(self) -> grpc.aio.UnaryStreamCall:
        return self._stub.StreamLoadingProgress(inference_pb2.StreamLoadingProgressRequest(), metadata=self._metadata)

    def generate(self, request: inference_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        return self._stub.Generate(request, metadata=self._metadata)

    async def cancel(self, request_id: str, timeout: float) -> inference_pb2.CancelResponse:
        try:
            return await self._stub.Cancel(
                inference_pb2.CancelRequest(request_id=request_id), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as err:
            raise self.error(err) from None

    async def shutdown(self, drain_timeout_s: int = 0, timeout: float = 10.0) -> inference_pb2.ShutdownResponse:
        try:
            return await self._stub.Shutdown(
                inference_pb2.ShutdownRequest(drain_timeout_s=drain_timeout_s), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as err:
            raise self.error(err) from None

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
                    [
                        f"Check that llm-worker-rbee is running and listening on {self.address}",
                        "Check the host and port given with --worker",
                    ],
                )
        return self.error(err)
