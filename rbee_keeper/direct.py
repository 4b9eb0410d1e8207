"""Inference straight against one worker (S1 step 10, S9): wait for it to be
loaded, stream the answer, and deal with busy workers, stalls, broken streams
and Ctrl+C."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from rbee.backends import backend_name
from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import inference_pb2

from rbee_keeper.interrupts import EXIT_INTERRUPTED, Interrupted, Interrupts
from rbee_keeper.partial import save_partial, tokens_generated
from rbee_keeper.readiness import ReadinessWaiter, check_expected
from rbee_keeper.render import LoadingView, OutputClosed, TokenPrinter, finish_reason, summary_line
from rbee_keeper.validation import SamplingArgs
from rbee_keeper.worker_client import WorkerClient

T = TypeVar("T")


@dataclass(frozen=True)
class Timeouts:
    # First readiness query. With wait_for_server the keeper waits that long
    # for a worker that is still starting its server instead of failing at once.
    connect_s: float = 10.0
    wait_for_server: bool = False
    loading_s: float = 300.0
    stall_s: float = 60.0
    cancel_ack_s: float = 5.0
    busy_delays_s: tuple[float, ...] = (1.0, 2.0, 4.0)


def new_request_id() -> str:
    return f"keeper-{uuid.uuid4().hex[:16]}"


def build_request(args: SamplingArgs, request_id: str) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(
        request_id=request_id,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
        raw_prompt=args.raw_prompt,
        ignore_eos=args.ignore_eos,
    )
    # Optional fields are set only when given so the worker's defaults apply.
    if args.temperature is not None:
        req.temperature = args.temperature
    if args.top_p is not None:
        req.top_p = args.top_p
    if args.top_k is not None:
        req.top_k = args.top_k
    if args.seed is not None:
        req.seed = args.seed
    if args.messages:
        req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in args.messages)
    if args.json_schema is not None:
        req.json_schema = args.json_schema
    if args.logprobs is not None:
        req.logprobs = args.logprobs
    if args.n is not None:
        req.n = args.n
    return req


def _logprob_entry(p: inference_pb2.PositionLogprobs) -> dict:
    def one(t: inference_pb2.TokenLogprob) -> dict:
        return {"token_id": t.token_id, "token": t.token, "logprob": round(t.logprob, 4)}

    return {**one(p.chosen), "top": [one(t) for t in p.top]}


def _slots(err: RbeeError) -> str:
    total, busy = err.details.get("slots_total"), err.details.get("slots_busy")
    return f"{busy}/{total} slots busy" if total and busy else "all slots busy"


class DirectInference:
    def __init__(
        self,
        client: WorkerClient,
        args: SamplingArgs,
        narrate: Narrator,
        printer: TokenPrinter,
        interrupts: Interrupts,
        timeouts: Timeouts = Timeouts(),
        loading_view: Callable[[], LoadingView] | None = None,
        expect_backend: str | None = None,
        expect_device: int | None = None,
        partial_folder: Path | None = None,
    ) -> None:
        self.client = client
        self.args = args
        self.narrate = narrate
        self.printer = printer
        self.interrupts = interrupts
        self.t = timeouts
        self._loading_view = loading_view or (lambda: LoadingView(client.address, narrate))
        self._expect = (expect_backend, expect_device)
        self._partial_folder = partial_folder
        self.request_id = ""
        # With --n: the other answers, printed after the first one has streamed.
        self.others: dict[int, list[inference_pb2.TokenDelta]] = {}
        # With --logprobs: the first answer's tokens with their log probabilities.
        self.logprobs: list[dict] = []

    @property
    def worker(self) -> str:
        return self.client.address

    async def run(self) -> int:
        """0 when the answer was streamed, 130 after Ctrl+C; RbeeError otherwise."""
        try:
            waiter = ReadinessWaiter(
                self.client, self.narrate, self.t.connect_s, self.t.wait_for_server, self.t.loading_s, self._loading_view
            )
            ready = await self._interruptible(waiter.wait())
            check_expected(ready, self.worker, *self._expect)
            self.narrate(
                "🐝",
                f"Worker {self.worker} ready: {ready.model_ref or 'model'} on {backend_name(ready.backend) or '?'}:{ready.device} "
                f"({ready.slots_busy}/{ready.slots_total} slots busy)",
            )
            started = time.monotonic()
            final, first_token_at = await self._generate_with_retries()
        except Interrupted:
            self.printer.end_line()
            return EXIT_INTERRUPTED
        extra = self._after_answer()
        self.printer.end_line()
        elapsed = time.monotonic() - started
        ttft = (first_token_at - started) * 1000 if first_token_at is not None else None
        self.printer.finished(final, self.worker, elapsed, ttft, extra=extra)
        self.narrate("✅", summary_line(self.printer.tokens, elapsed, ttft, finish_reason(final)))
        return 0

    # -- generation --------------------------------------------------------

    def _take(self, delta: inference_pb2.TokenDelta) -> None:
        """The first answer streams; the others (--n) wait for it to end."""
        if delta.completion:
            self.others.setdefault(delta.completion, []).append(delta)
            return
        self.logprobs.extend(_logprob_entry(p) for p in delta.logprobs)
        self.printer.write(delta)

    def _after_answer(self) -> dict:
        """Print the other answers and the log probabilities; what --json adds."""
        extra: dict = {}
        if self.others:
            texts = [self.printer.text]
            for c in sorted(self.others):
                texts.append("".join(d.text for d in self.others[c]))
                if not self.printer.json:
                    self.narrate("🐝", f"Answer {c + 1} of {len(self.others) + 1} follows")
                    sep = "" if self.printer.text.endswith("\n") else "\n"
                    self.printer.write(inference_pb2.TokenDelta(text=sep + "\n"))
                    for d in self.others[c]:
                        self.printer.write(d)
            extra["completions"] = texts
        if self.args.logprobs is not None:
            extra["logprobs"] = self.logprobs
            if not self.printer.json:
                for e in self.logprobs:
                    alts = ", ".join(f"{t['token']!r} {t['logprob']:.3f}" for t in e["top"] if t["token_id"] != e["token_id"])
                    self.narrate("🔢", f"{e['token']!r} {e['logprob']:.3f}" + (f" (alternatives: {alts})" if alts else ""))
        return extra

    async def _generate_with_retries(self) -> tuple[inference_pb2.GenerateFinal, float | None]:
        delays = list(self.t.busy_delays_s)
        retries = len(delays)
        while True:
            self.request_id = new_request_id()
            try:
                return await self._stream_once(build_request(self.args, self.request_id))
            except RbeeError as err:
                if err.code != "ALL_SLOTS_BUSY" or self.printer.tokens:
                    raise
                if not delays:
                    raise self._still_busy(err, retries) from None
                delay = delays.pop(0)
                self.narrate(
                    "⏳",
                    f"Worker {self.worker} is busy ({_slots(err)}); "
                    f"retry {retries - len(delays)} of {retries} in {delay:g}s",
                )
                await self._interruptible(asyncio.sleep(delay))

    def _still_busy(self, err: RbeeError, retries: int) -> RbeeError:
        details = dict(err.details)
        details.update(worker=self.worker, retries=str(retries))
        return RbeeError(
            "ALL_SLOTS_BUSY",
            f"Worker {self.worker} is still busy after {retries} retries ({_slots(err)})" if retries
            else f"Worker {self.worker} is busy ({_slots(err)})",
            details,
            [
                "Wait for the running requests to finish, then try again",
                "Start another worker for this model and send the request there",
                "Restart the worker with more request slots (llm-worker-rbee --slots N)",
            ],
        )

    async def _stream_once(self, request: inference_pb2.GenerateRequest) -> tuple[inference_pb2.GenerateFinal, float | None]:
        call = self.client.generate(request)
        interrupted = asyncio.ensure_future(self.interrupts.event.wait())
        read: asyncio.Future | None = None
        first_token_at: float | None = None
        last_activity = time.monotonic()
        try:
            while True:
                if read is None:
                    read = asyncio.ensure_future(call.read())
                quiet_for = time.monotonic() - last_activity
                done, _ = await asyncio.wait(
                    {read, interrupted},
                    timeout=max(0.0, self.t.stall_s - quiet_for),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if read in done:
                    msg = self._message(read)
                    read = None
                elif interrupted in done:
                    await self._cancel_after_interrupt(call, read)
                    raise Interrupted
                else:
                    raise await self._stalled(read)
                kind = msg.WhichOneof("kind")
                if kind == "delta":
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                    try:
                        self._take(msg.delta)
                    except OutputClosed:
                        raise await self._output_closed() from None
                    last_activity = time.monotonic()
                elif kind == "final":
                    await self._settle(call)
                    return self._finished(msg.final), first_token_at
        finally:
            interrupted.cancel()
            if read is not None and not read.done():
                read.cancel()
            if not call.done():
                call.cancel()

    @staticmethod
    async def _settle(call: grpc.aio.UnaryStreamCall) -> None:
        """Let the call end with its status after the final message, so the
        worker sees a finished request rather than a client going away."""
        try:
            await asyncio.wait_for(call.code(), timeout=2.0)
        except (TimeoutError, grpc.RpcError):
            pass

    def _message(self, read: asyncio.Future) -> inference_pb2.GenerateResponse:
        try:
            msg = read.result()
        except grpc.RpcError as err:
            raise self._failed(self.client.error(err)) from None
        except asyncio.CancelledError:
            # The call itself was cancelled under us (channel closed).
            raise self._broken(None) from None
        if msg is grpc.aio.EOF:
            raise self._broken(RbeeError("STREAM_BROKEN", "the stream ended without a final message"))
        return msg

    def _failed(self, err: RbeeError) -> RbeeError:
        # A refusal before any token (busy, bad argument, auth, loading) is the
        # worker's answer; anything else means the stream broke under us.
        refused = not self.printer.tokens and "grpc_status" not in err.details
        return err if refused else self._broken(err)

    def _finished(self, final: inference_pb2.GenerateFinal) -> inference_pb2.GenerateFinal:
        # Errors arrive as a status, never in the final message.
        if final.reason == inference_pb2.FINISH_REASON_ABORT:
            raise self._with_partial(
                "CANCELLED",
                f"Request {self.request_id} was cancelled on worker {self.worker}",
                None,
                ["Someone cancelled the request on the worker (or it is shutting down); run the command again"],
            )
        return final

    def _broken(self, cause: RbeeError | None) -> RbeeError:
        return self._with_partial(
            "STREAM_BROKEN",
            f"Stream from worker {self.worker} closed unexpectedly",
            cause,
            [
                f"Check that the worker at {self.worker} is still running (it may have crashed or been killed)",
                "Look at the worker's log for the reason, then run the command again",
            ],
        )

    def _with_partial(self, code: str, message: str, cause: RbeeError | None, suggestions: list[str]) -> RbeeError:
        details: dict[str, str] = {"worker": self.worker, "request_id": self.request_id}
        if cause is not None:
            details["cause"] = f"{cause.code}: {cause.message}"
        details["tokens generated"] = tokens_generated(self.printer.tokens, self.args.max_tokens)
        if self.printer.text:
            path = save_partial(self.printer.text, self.request_id, self._partial_folder)
            details["partial result"] = str(path) if path else "could not be saved (no writable folder)"
        else:
            details["partial result"] = "none (no text was generated)"
        self.printer.end_line()
        return RbeeError(code, message, details, suggestions)

    async def _stalled(self, read: asyncio.Future) -> RbeeError:
        self.narrate("⚠️", f"No token from {self.worker} for {self.t.stall_s:g}s: cancelling request {self.request_id}")
        confirmed = await self._send_cancel()
        err = self._with_partial(
            "STREAM_STALLED",
            f"Worker {self.worker} sent no token for {self.t.stall_s:g}s; request {self.request_id} was cancelled",
            None,
            [
                f"Check the worker's health and load (rbee-keeper workers list, or its log)",
                "Run the command again; a stuck worker may need a restart",
            ],
        )
        err.details["cancel"] = "confirmed by the worker" if confirmed else "not confirmed"
        return err

    async def _output_closed(self) -> RbeeError:
        confirmed = await self._send_cancel()
        return RbeeError(
            "CANCELLED",
            f"stdout was closed by the program reading it; request {self.request_id} was cancelled",
            {
                "worker": self.worker,
                "tokens generated": tokens_generated(self.printer.tokens, self.args.max_tokens),
                "cancel": "confirmed by the worker" if confirmed else "not confirmed",
            },
            ["Lower --max-tokens if only the start of the answer is needed"],
        )

    async def _send_cancel(self) -> bool:
        try:
            await self.client.cancel(self.request_id, timeout=self.t.cancel_ack_s)
            return True
        except RbeeError as err:
            self.narrate("⚠️", f"Cancel of {self.request_id} failed: {err.code}: {err.message}")
            return False

    async def _cancel_after_interrupt(self, call: grpc.aio.UnaryStreamCall, read: asyncio.Future | None) -> None:
        self.narrate(
            "🛑",
            f"Ctrl+C: cancelling request {self.request_id} on {self.worker} "
            f"(waiting up to {self.t.cancel_ack_s:g}s; Ctrl+C again quits at once)",
        )
        deadline = time.monotonic() + self.t.cancel_ack_s
        cancel = asyncio.ensure_future(self.client.cancel(self.request_id, timeout=self.t.cancel_ack_s))
        final: inference_pb2.GenerateFinal | None = None
        stream_open = True
        # Tokens already on their way are still printed; the stream should end
        # with finish reason "cancelled".
        while stream_open and time.monotonic() < deadline:
            if read is None:
                read = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({read}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                break
            try:
                msg = read.result()
            except (grpc.RpcError, asyncio.CancelledError):
                stream_open = False
                continue
            read = None
            if msg is grpc.aio.EOF:
                stream_open = False
            elif msg.WhichOneof("kind") == "delta":
                self._take(msg.delta)
            elif msg.WhichOneof("kind") == "final":
                final = msg.final
                stream_open = False
        if read is not None and not read.done():
            read.cancel()
        reply_ok = False
        try:
            await asyncio.wait_for(asyncio.shield(cancel), timeout=max(0.0, deadline - time.monotonic()))
            reply_ok = True
        except (RbeeError, TimeoutError) as exc:
            if isinstance(exc, RbeeError):
                self.narrate("⚠️", f"Cancel of {self.request_id} failed: {exc.code}: {exc.message}")
            cancel.cancel()
        self.printer.end_line()
        if final is not None and final.reason == inference_pb2.FINISH_REASON_ABORT:
            self.narrate(
                "✅",
                f"Request {self.request_id} cancelled; the worker confirmed after "
                f"{final.tokens_generated} tokens",
            )
        elif final is not None:
            self.narrate("✅", f"Request {self.request_id} had already finished ({finish_reason(final)})")
        elif reply_ok:
            self.narrate("✅", f"Worker {self.worker} confirmed the cancel of {self.request_id}")
        else:
            self.narrate(
                "⚠️",
                f"Worker {self.worker} did not confirm the cancel within {self.t.cancel_ack_s:g}s; "
                "closing the stream (the worker frees the slot when it sees the disconnect)",
            )

    async def _interruptible(self, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        interrupted = asyncio.ensure_future(self.interrupts.event.wait())
        try:
            done, _ = await asyncio.wait({task, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.narrate("🛑", "Ctrl+C: stopped (no request of ours is running on the worker)")
        raise Interrupted
