"""InferenceService: readiness, loading progress, token streams, cancel, shutdown,
model info and load."""

from __future__ import annotations

import asyncio
import logging
import dataclasses
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from rbee.backends import backend_enum
from rbee.config import VERSION
from rbee.errors import RbeeError
from rbee.narration import Narrator, stage_of
from rbee.rpc import handle_errors
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from rbee_worker.contract import ParsedRequest, check_cancel_ids, defaults, invalid, max_tokens_for, parse_request
from rbee_worker.engine import Engine
from rbee_worker.request_load import TokenRate, worker_load
from rbee_worker.settings import DEFAULT_DRAIN_TIMEOUT_S
from rbee_worker.sleep import SleepControl, SleepRpcs
from rbee_worker.status import (
    BUSY,
    DRAINING,
    FAILED,
    IDLE,
    LOADING,
    STOPPED,
    Identity,
    WorkerStatus,
)
from rbee_worker.stream import ActiveRequest

log = logging.getLogger(__name__)

# After the drain timeout, aborted streams get this long to send their final message.
ABORT_GRACE_S = 5.0


class InferenceServicer(SleepRpcs, inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: Engine,
        status: WorkerStatus,
        identity: Identity,
        slots: int,
        narrator: Narrator,
        on_shutdown: Callable[[float], None] = lambda timeout_s: None,
        coalesce: bool = True,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._engine = engine
        self._status = status
        self._identity = identity
        self.slots_total = slots
        self._narrate = narrator
        self._on_shutdown = on_shutdown
        self._coalesce = coalesce
        self._active: dict[str, ActiveRequest] = {}
        # Requests being tokenized: they hold a slot, not yet an engine request.
        self._tokenizing: set[str] = set()
        # The chat template and the tokenizer run here, never on the event
        # loop: a long prompt would stall every other call, health included.
        # One thread: a tokenizer is not safe for concurrent use, and one long
        # prompt at a time bounds the CPU and memory they take.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.token_rate = TokenRate()
        # Wall-clock on purpose: reported to the hive as a timestamp.
        self.last_activity_unix_ms = int(time.time() * 1000)
        engine.on_death(self._engine_died)
        # Sleep mode on CUDA (rbee_worker/sleep.py).
        self.sleep = SleepControl(engine, identity.backend, lambda: self.slots_busy, narrator)

    @property
    def slots_busy(self) -> int:
        return len(self._active) + len(self._tokenizing)

    # -- readiness -----------------------------------------------------------

    @handle_errors
    async def GetReadiness(self, request, context) -> inference_pb2.GetReadinessResponse:
        st = self._status
        ident = self._identity
        info = st.info
        return inference_pb2.GetReadinessResponse(
            worker_id=ident.worker_id,
            state=st.state,
            model_loaded=st.model_loaded,
            progress=st.progress,
            slots_total=self.slots_total,
            slots_busy=self.slots_busy,
            model_ref=ident.model_ref,
            backend=backend_enum(ident.backend),
            device=ident.device,
            max_model_len=info.max_model_len if info else 0,
            engine_version=info.engine_version if info else "",
            worker_version=VERSION,
        )

    @handle_errors
    async def StreamLoadingProgress(self, request, context):
        st = self._status
        updates = st.subscribe()
        try:
            # The stream ends after it has sent a state other than LOADING:
            # looping on st.state instead could end it on a LOADING message
            # when the state changed while that message was on its way.
            sent = st.state
            yield inference_pb2.StreamLoadingProgressResponse(state=sent, progress=st.progress)
            while sent == LOADING:
                item = await updates.get()
                if isinstance(item, int):
                    sent = item
                    yield inference_pb2.StreamLoadingProgressResponse(state=item, progress=st.progress)
                elif item.DESCRIPTOR.name == "ProgressEvent":
                    sent = st.state
                    yield inference_pb2.StreamLoadingProgressResponse(state=sent, progress=item)
                else:
                    sent = st.state
                    yield inference_pb2.StreamLoadingProgressResponse(state=sent, narration=item)
            if st.state == FAILED:
                raise st.error or RbeeError("MODEL_LOAD_FAILED", "Loading the model failed")
        finally:
            st.unsubscribe(updates)

    # -- generation ----------------------------------------------------------

    def _check_accepting(self) -> None:
        state = self._status.state
        if state == LOADING:
            p = self._status.progress
            stage = stage_of(p)
            raise RbeeError(
                "MODEL_LOADING",
                f"The model is still loading (stage {stage}, {p.done}/{p.total})",
                {"stage": stage, "done": p.done, "total": p.total},
                ["Wait for readiness (GetReadiness or StreamLoadingProgress) and retry"],
            )
        if state == FAILED:
            err = self._status.error
            reason = err.message if err else "unknown error"
            if not self._status.model_loaded:
                raise RbeeError(
                    "MODEL_LOAD_FAILED",
                    f"This worker failed to load its model: {reason}",
                    {"model_path": self._identity.model_path},
                )
            # The engine died after loading: every later request gets the
            # same error (ENGINE_OOM_KILLED, ENGINE_DIED, ...), code and all.
            raise RbeeError(
                err.code if err else "INTERNAL",
                f"This worker's engine has stopped: {reason}",
                {**(err.details if err else {}), "worker_id": self._identity.worker_id},
                (err.suggestions if err else []) or ["Start a new worker for this model"],
            )
        if state in (DRAINING, STOPPED):
            raise RbeeError(
                "WORKER_DRAINING",
                "The worker is shutting down and accepts no new requests",
                {"slots_total": self.slots_total, "slots_busy": self.slots_busy},
                ["Retry on another worker, or start a new one"],
            )

    def _engine_died(self, err: RbeeError) -> None:
        """The engine's process is gone (the engine says why): say so in the
        log, end the streams in flight with the error, and turn FAILED, which
        refuses later requests with it and reports it to the hive."""
        details = ", ".join(f"{k} {v}" for k, v in err.details.items() if k != "evidence")
        self._narrate("💀", f"{err.code}: {err.message} ({details})", level="error")
        if "evidence" in err.details:
            self._narrate("🔎", f"Evidence: {err.details['evidence']}", level="error")
        for suggestion in err.suggestions:
            self._narrate("💡", suggestion, level="error")
        for active in list(self._active.values()):
            active.fail(RbeeError(err.code, err.message, err.details, err.suggestions))
        self._status.failed(err)

    def _check_capacity(self, request_id: str) -> None:
        if request_id in self._active or request_id in self._tokenizing:
            raise RbeeError(
                "DUPLICATE_REQUEST_ID",
                f"A request with id {request_id!r} is already running on this worker",
                {"request_id": request_id},
                ["Use a fresh request id (or leave it empty to get one)"],
            )
        if self.slots_busy >= self.slots_total:
            raise RbeeError(
                "ALL_SLOTS_BUSY",
                f"All {self.slots_total} slots are busy",
                {"slots_total": self.slots_total, "slots_busy": self.slots_busy},
                ["Retry in a few seconds", "Start another worker for this model"],
            )

    def _acquire(self, request_id: str, active: ActiveRequest) -> None:
        self._check_capacity(request_id)
        self._active[request_id] = active
        self.last_activity_unix_ms = int(time.time() * 1000)
        self._idle.clear()
        self._status.set_state(BUSY)

    def _release(self, active: ActiveRequest, how: str) -> None:
        """Free the slot once (from the stream's finally or the RPC's done
        callback, whichever comes first); never awaits."""
        if self._active.get(active.request_id) is not active:
            return
        del self._active[active.request_id]
        self.last_activity_unix_ms = int(time.time() * 1000)
        if active.producing:
            active.cancel()
            self._spawn(self._engine.abort(active.request_id))
        if how == "disconnected":
            self._narrate(
                "🔌",
                f"Client disconnected from {active.request_id} after {active.tokens} tokens; "
                "request aborted, slot freed",
                level="warn",
            )
        elif how == "failed":
            self._narrate("❌", f"Request {active.request_id} failed after {active.tokens} tokens", level="error")
        else:
            final = active.final()
            self._narrate(
                "✅",
                f"Request {active.request_id}: {final.tokens_generated} tokens in {final.duration_ms} ms "
                f"({active.finish_reason})",
            )
        if not self._active:
            self._idle.set()
            self._status.set_state(IDLE)

    def _spawn(self, coro) -> None:
        # gRPC runs RPC-done callbacks on the server's loop, which Generate recorded.
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    def _encode(self, parsed: ParsedRequest) -> list[int]:
        if parsed.input_kind == "chat":
            return self._engine.encode_chat(parsed.messages)
        return self._engine.encode(parsed.prompt, parsed.raw_prompt)

    async def _prompt_ids(self, request_id: str, parsed: ParsedRequest) -> list[int]:
        """The prompt's token ids, tokenized off the event loop while the
        request holds a slot (so a full worker refuses before tokenizing)."""
        if parsed.input_kind == "token_ids":
            return list(parsed.token_ids)
        self._tokenizing.add(request_id)
        try:
            return await self._loop.run_in_executor(self._tokenizer_pool, self._encode, parsed)
        finally:
            self._tokenizing.discard(request_id)

    @handle_errors
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        self._loop = asyncio.get_running_loop()
        self._check_accepting()
        parsed = parse_request(request, self._status.info, self.slots_total)
        request_id = request.request_id or f"req-{uuid.uuid4().hex[:12]}"
        # A full worker answers before spending time on the tokenizer.
        self._check_capacity(request_id)
        prompt_ids = await self._prompt_ids(request_id, parsed)
        if context.done():
            return  # the client left while its prompt was tokenized: the engine never sees it
        # The worker may have begun draining (or failed) meanwhile. No await
        # from here to _acquire, so the checks and the slot taken are one step.
        self._check_accepting()
        self._check_capacity(request_id)
        max_tokens = max_tokens_for(self._status.info, len(prompt_ids), parsed.max_tokens)
        if parsed.options.min_tokens > max_tokens:
            raise invalid("min_tokens", f"{parsed.options.min_tokens} is more than max_tokens {max_tokens}")
        options = dataclasses.replace(parsed.options, max_tokens=max_tokens)
        active = ActiveRequest(
            request_id, self._engine, prompt_ids, options, coalesce=self._coalesce, on_tokens=self.token_rate.add
        )
        self._acquire(request_id, active)
        how = "disconnected"
        # The RPC's end (client gone, deadline) frees the slot even when the
        # stream is parked inside a write and its finally has not run yet.
        context.add_done_callback(lambda _ctx: self._release(active, how="disconnected"))
        try:
            await self.sleep.wake("a request came")
            active.start()
            self._narrate(
                "🧠",
                f"Generating {request_id}: prompt {len(prompt_ids)} tokens, max_tokens {options.max_tokens}"
                + (f", n {options.n}" if options.n > 1 else "")
                + f", slots {self.slots_busy}/{self.slots_total}",
            )
            async for message in active.messages():
                if active.finish_reason is not None:
                    # Free the slot before the final leaves, so a client that
                    # reads it and asks for readiness sees the slot free.
                    how = "done"
                    self._release(active, how)
                yield message
        except RbeeError:
            how = "failed"
            raise
        finally:
            self._release(active, how)

    # -- model info and load -------------------------------------------------

    @handle_errors
    async def GetModelInfo(self, request, context) -> inference_pb2.GetModelInfoResponse:
        info = self._status.info
        if info is None:
            self._check_accepting()
            raise RbeeError("MODEL_LOADING", "The model is not loaded yet")
        d = defaults(info)
        reply = inference_pb2.GetModelInfoResponse(
            model_ref=self._identity.model_ref,
            max_model_len=info.max_model_len,
            max_input_len=max(info.max_model_len - 1, 0),
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            has_chat_template=info.has_chat_template,
            defaults=inference_pb2.SamplingDefaults(
                temperature=d["temperature"],
                top_p=d["top_p"],
                top_k=int(d["top_k"]),
                min_p=d["min_p"],
                presence_penalty=d["presence_penalty"],
                frequency_penalty=d["frequency_penalty"],
                repetition_penalty=d["repetition_penalty"],
                max_tokens=int(d.get("max_tokens", 0)),
            ),
            max_logprobs=info.max_logprobs,
            engine_version=info.engine_version,
            worker_version=VERSION,
            tokenizer_sha256=info.tokenizer_sha256,
            max_n=self.slots_total,
            dtype=info.dtype,
            dtype_reason=info.dtype_reason,
            cpu_threads=info.cpu_threads,
            cpu_set=info.cpu_set,
            kv_cache_bytes=info.kv_cache_bytes,
        )
        if info.bos_token_id is not None:
            reply.bos_token_id = info.bos_token_id
        if info.pad_token_id is not None:
            reply.pad_token_id = info.pad_token_id
        return reply

    def load(self) -> common_pb2.WorkerLoad:
        engine = self._engine.load_stats() if self._status.model_loaded else None
        return worker_load(self.slots_total, self.slots_busy, self.token_rate, engine)

    @handle_errors
    async def GetLoad(self, request, context) -> inference_pb2.GetLoadResponse:
        return inference_pb2.GetLoadResponse(state=self._status.state, load=self.load())

    # -- cancel and shutdown -------------------------------------------------

    @handle_errors
    async def Cancel(self, request: inference_pb2.CancelRequest, context) -> inference_pb2.CancelResponse:
        ids = check_cancel_ids(request.request_id, request.request_ids)
        if not ids:
            raise invalid("request_ids", "give at least one request id")
        reason = request.reason or "cancelled by a client"
        cancelled = await self.cancel(ids, reason)
        return inference_pb2.CancelResponse(cancelled=bool(cancelled), request_id=request.request_id, cancelled_ids=cancelled)

    async def cancel(self, request_ids: list[str], reason: str) -> list[str]:
        """Abort the running ones among request_ids; returns those. The engine
        has been told to abort each before this returns."""
        chosen = [(i, a) for i in request_ids if (a := self._active.get(i)) is not None and a.cancel(reason)]
        for request_id, active in chosen:
            await self._engine.abort(request_id)
            self._narrate("🛑", f"Cancelled {request_id} after {active.tokens} tokens ({reason})")
        return [i for i, _ in chosen]

    @handle_errors
    async def Shutdown(self, request: inference_pb2.ShutdownRequest, context) -> inference_pb2.ShutdownResponse:
        timeout = request.drain_timeout_ms / 1000 if request.drain_timeout_ms else DEFAULT_DRAIN_TIMEOUT_S
        in_flight = self.begin_drain()
        self._on_shutdown(timeout)
        return inference_pb2.ShutdownResponse(state=self._status.state, in_flight=in_flight)

    def begin_drain(self) -> int:
        """Refuse new work from now on; returns the requests still in flight."""
        if self._status.set_state(DRAINING):
            self._narrate("🌙", f"Draining: {self.slots_busy} request(s) in flight, new requests refused")
        return self.slots_busy

    async def drain(self, timeout_s: float) -> int:
        """Let in-flight requests finish for up to timeout_s, then cancel the
        rest (their streams end with reason ABORT). Returns how many were cut."""
        self.begin_drain()
        if self._active:
            self._narrate("⏳", f"Waiting up to {timeout_s:g} s for {self.slots_busy} request(s) to finish")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return 0
        except TimeoutError:
            pass
        self._narrate(
            "⏱️", f"Drain timeout ({timeout_s:g} s): cancelling {self.slots_busy} request(s)", level="warn"
        )
        return await self.cancel_all("worker draining: drain timeout")

    async def cancel_all(self, reason: str = "worker shutting down") -> int:
        """Cancel every request in flight (each stream ends with reason ABORT)
        and wait, bounded, for their streams to end."""
        remaining = list(self._active)
        await self.cancel(remaining, reason)
        if self._active:
            try:
                await asyncio.wait_for(self._idle.wait(), ABORT_GRACE_S)
            except TimeoutError:
                log.warning("%d stream(s) did not end after cancel", len(self._active))
        return len(remaining)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task failed: %r", task.exception())
