"""An in-process InferenceService for testing keeper's client logic alone.

Only the keeper side is under test here; the real worker is exercised in
tests/integration. The fake is scripted per test: tokens to send, how many
requests to refuse as busy, where to stall or break the stream, how loading
goes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from rbee.auth import ScopedKeyInterceptor, static_ring
from rbee.errors import RbeeError
from rbee.narration import progress_event
from rbee.scopes import Scope
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc

WS = common_pb2.WorkerState
API_KEY = "unit-test-key"


@dataclass
class Script:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " bees", "!"])
    token_delay_s: float = 0.0
    busy_times: int = 0
    stall_after: int | None = None
    break_after: int | None = None
    refuse_with: RbeeError | None = None
    final_reason: str = "stop"
    state: int = WS.WORKER_STATE_IDLE
    # Progress messages streamed while loading; then the worker turns idle,
    # unless loading_forever.
    loading: list[tuple[str, int, int]] = field(default_factory=list)
    loading_forever: bool = False
    cancel_hangs: bool = False


class FakeWorker(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.cancels: list[str] = []
        self.first_token_sent = asyncio.Event()
        self._cancel_events: dict[str, asyncio.Event] = {}

    async def GetReadiness(self, request, context):
        return inference_pb2.GetReadinessResponse(
            worker_id="fake-worker",
            state=self.script.state,
            model_loaded=self.script.state == WS.WORKER_STATE_IDLE,
            slots_total=1,
            slots_busy=1 if self.script.busy_times else 0,
            model_ref="file:///models/fake",
            backend=common_pb2.BACKEND_CPU,
            device=0,
        )

    async def StreamLoadingProgress(self, request, context):
        for stage, done, total in self.script.loading:
            yield inference_pb2.StreamLoadingProgressResponse(
                state=WS.WORKER_STATE_LOADING,
                progress=progress_event(stage, done, total, unit="stages"),
            )
            await asyncio.sleep(0.01)
        if self.script.loading_forever:
            await asyncio.Event().wait()
        self.script.state = WS.WORKER_STATE_IDLE
        yield inference_pb2.StreamLoadingProgressResponse(state=WS.WORKER_STATE_IDLE)

    async def Generate(self, request, context):
        self.requests.append(request)
        script = self.script
        if script.refuse_with is not None:
            await context.abort_with_status(script.refuse_with.to_status())
        if script.busy_times > 0:
            script.busy_times -= 1
            busy = RbeeError("ALL_SLOTS_BUSY", "All slots busy", {"slots_total": 1, "slots_busy": 1})
            await context.abort_with_status(busy.to_status())
        cancelled = self._cancel_events.setdefault(request.request_id, asyncio.Event())
        sent = 0
        for i, text in enumerate(script.tokens[: request.max_tokens]):
            if cancelled.is_set():
                break
            if script.stall_after is not None and i == script.stall_after:
                await cancelled.wait()
                break
            if script.break_after is not None and i == script.break_after:
                # No rbee details: what a dying peer looks like to the client.
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            yield inference_pb2.GenerateResponse(
                delta=inference_pb2.TokenDelta(index=i, text=text, token_ids=[100 + i])
            )
            sent += 1
            self.first_token_sent.set()
            if script.token_delay_s:
                try:
                    await asyncio.wait_for(cancelled.wait(), script.token_delay_s)
                except TimeoutError:
                    pass
        reason = "abort" if cancelled.is_set() else script.final_reason
        yield inference_pb2.GenerateResponse(
            final=inference_pb2.GenerateFinal(
                reason=inference_pb2.FinishReason.Value(f"FINISH_REASON_{reason.upper()}"), tokens_generated=sent, request_id=request.request_id, duration_ms=1
            )
        )

    async def Cancel(self, request, context):
        self.cancels.append(request.request_id)
        if self.script.cancel_hangs:
            await asyncio.Event().wait()
        event = self._cancel_events.setdefault(request.request_id, asyncio.Event())
        was_running = not event.is_set()
        event.set()
        return inference_pb2.CancelResponse(cancelled=was_running, request_id=request.request_id)


async def start_fake(script: Script) -> tuple[grpc.aio.Server, FakeWorker, str]:
    # As a worker started by hand: its one key opens inference and Shutdown.
    server = grpc.aio.server(interceptors=[ScopedKeyInterceptor(static_ring((Scope.INFERENCE, API_KEY), (Scope.ADMIN, API_KEY)))])
    servicer = FakeWorker(script)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"
