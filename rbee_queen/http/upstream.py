"""The queen as a client of workers: one gRPC channel per worker address,
reused by every HTTP request (mutual TLS with the queen's client certificate
when the worker serves it), and one Generate call per request whose end, for
whatever reason (done, client gone, error), cancels it on the worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from rbee.channel import metadata, open_channel
from rbee.errors import RbeeError, from_rpc_error
from rbee.v1 import inference_pb2, inference_pb2_grpc

from rbee_queen.hives import cluster_ca


@dataclass(frozen=True)
class WorkerLease:
    node: str
    worker_id: str
    address: str
    api_key: str
    tls: bool
    model_ref: str
    # The identity name the worker's certificate carries (rbee/tls_identity.py).
    tls_name: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return metadata(self.api_key)


class WorkerChannels:
    def __init__(self) -> None:
        self._channels: dict[tuple[str, bool, str], grpc.aio.Channel] = {}

    def get(self, lease: WorkerLease) -> grpc.aio.Channel:
        key = (lease.address, lease.tls, lease.tls_name)
        channel = self._channels.get(key)
        if channel is None:
            tls = cluster_ca().client_identity().for_peer(lease.tls_name or None) if lease.tls else None
            channel = open_channel(lease.address, tls)
            self._channels[key] = channel
        return channel

    async def drop(self, lease: WorkerLease) -> None:
        channel = self._channels.pop((lease.address, lease.tls, lease.tls_name), None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        for channel in list(self._channels.values()):
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        self._channels.clear()

    async def generate(self, lease: WorkerLease, request: inference_pb2.GenerateRequest) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """The worker's messages for ``request``; its errors as RbeeError. Leaving
        the iteration early (the HTTP client went away) cancels the call, which
        the worker takes as a cancel of the request."""
        stub = inference_pb2_grpc.InferenceServiceStub(self.get(lease))
        call = stub.Generate(request, metadata=lease.metadata)
        began = False
        try:
            async for msg in call:
                began = True
                yield msg
        except grpc.RpcError as err:
            error = from_rpc_error(err, lease.address)
            if began and error.code in ("UNAVAILABLE", "CANCELLED", "WORKER_UNREACHABLE"):
                raise RbeeError("STREAM_BROKEN", f"Worker {lease.worker_id} on {lease.node} stopped answering mid-stream",
                                {"worker": lease.worker_id, "node": lease.node}) from None  # fmt: skip
            raise error from None
        finally:
            call.cancel()
