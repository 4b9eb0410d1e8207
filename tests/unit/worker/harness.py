"""An in-process worker: the real servicer and gRPC server (port 0) around a FakeEngine."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.narration import Narrator
from rbee.v1 import inference_pb2, inference_pb2_grpc
from rbee_worker.grpc_server import WorkerServer, create_server
from rbee_worker.servicer import InferenceServicer
from rbee_worker.status import Identity, WorkerStatus
from tests.unit.worker.fakes import FakeEngine

KEY = "unit-test-key"
MD = auth_metadata(KEY)


@dataclass
class Harness:
    engine: FakeEngine
    status: WorkerStatus
    servicer: InferenceServicer
    server: WorkerServer
    channel: grpc.aio.Channel
    log: io.StringIO
    shutdown_requests: list[float] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    async def load(self) -> None:
        try:
            info = await self.engine.load(self.status.set_progress)
        except Exception as err:  # the program narrates; here the state is what matters
            self.status.failed(err)
            return
        self.status.loaded(info)

    async def readiness(self) -> inference_pb2.GetReadinessResponse:
        return await self.stub.GetReadiness(inference_pb2.GetReadinessRequest(), metadata=MD)

    async def health_status(self, service: str = "") -> int:
        # Watch's first message is the current status once pending updates ran.
        call = self.health.Watch(health_pb2.HealthCheckRequest(service=service))
        first = await call.read()
        call.cancel()
        return first.status

    def generate(self, **fields) -> grpc.aio.UnaryStreamCall:
        # None leaves a field unset (e.g. prompt=None to send chat or token_ids).
        fields.setdefault("max_tokens", 5)
        fields.setdefault("prompt", "hello there")
        fields = {k: v for k, v in fields.items() if v is not None}
        return self.stub.Generate(inference_pb2.GenerateRequest(**fields), metadata=MD)

    async def collect(self, **fields) -> tuple[list[inference_pb2.TokenDelta], list[inference_pb2.GenerateFinal]]:
        deltas, finals = [], []
        async for msg in self.generate(**fields):
            kind = msg.WhichOneof("kind")
            (deltas if kind == "delta" else finals).append(getattr(msg, kind))
        return deltas, finals


@asynccontextmanager
async def worker_harness(
    engine: FakeEngine | None = None, slots: int = 4, loaded: bool = True, coalesce: bool = True
) -> AsyncIterator[Harness]:
    engine = engine or FakeEngine()
    status = WorkerStatus()
    identity = Identity("w-unit", "test-model", "/models/test", "cpu", 0, "127.0.0.1", 0, os.getpid())
    log = io.StringIO()
    shutdowns: list[float] = []
    servicer = InferenceServicer(
        engine, status, identity, slots, Narrator("llm-worker-rbee", stream=log),
        on_shutdown=shutdowns.append, coalesce=coalesce,
    )
    server = await create_server(servicer, status, KEY)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    h = Harness(engine, status, servicer, server, channel, log, shutdowns)
    try:
        if loaded:
            await h.load()
        yield h
    finally:
        await channel.close()
        await server.server.stop(None)
