"""One generation in flight: the engine feeds a queue, the gRPC writer drains it.

A producer task pulls deltas from the engine into a queue; the writer takes
everything that is ready and sends it as ONE TokenDelta (one per completion
when a request asks for several). While a message is
being written the engine keeps producing, so under load each message carries
several tokens and the stream is not capped by gRPC's per-message cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from rbee.errors import RbeeError
from rbee.rpc import internal_error
from rbee.v1 import inference_pb2
from rbee_worker.contract import FINISH_REASONS, logprobs_to_proto, set_matched_stop
from rbee_worker.engine import ABORT, STOP, Delta, Engine, SamplingOptions


@dataclass(frozen=True)
class _End:
    reason: str


@dataclass
class _Completion:
    """One completion's progress: where its next token goes, how it ended."""

    tokens: int = 0
    last_token: int | None = None
    reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class _Batch:
    """Deltas of one completion drained together into one message."""

    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)


class ActiveRequest:
    def __init__(
        self,
        request_id: str,
        engine: Engine,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        coalesce: bool = True,
        on_tokens: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = len(prompt_token_ids)
        self.max_tokens = options.max_tokens
        self.tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.cancel_requested = False
        self.abort_reason = ""
        self._engine = engine
        self._prompt = prompt_token_ids
        self._options = options
        self._coalesce = coalesce
        self._on_tokens = on_tokens
        self._completions = [_Completion() for _ in range(options.n)]
        self._queue: asyncio.Queue[Delta | _End | BaseException] = asyncio.Queue()
        self._producer: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._first_token: float | None = None
        self._queue_time_s = 0.0
        self._prompt_logprobs_sent = False
        self._pending_prompt_logprobs: list | None = None

    def start(self) -> None:
        self._producer = asyncio.get_running_loop().create_task(self._produce(), name=f"generate-{self.request_id}")

    @property
    def producing(self) -> bool:
        return self._producer is not None and not self._producer.done()

    async def _produce(self) -> None:
        put = self._queue.put_nowait
        # Stop reading once every completion has ended, so a finished request
        # is never "still producing" (and aborted) while the engine winds down.
        left = set(range(self._options.n))
        try:
            async for delta in self._engine.generate(self.request_id, self._prompt, self._options):
                put(delta)
                if delta.finished:
                    left.discard(delta.completion)
                    if not left:
                        return
            put(_End(STOP))
        except asyncio.CancelledError:
            put(_End(ABORT))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the writer, which reports it
            put(exc)

    def cancel(self, reason: str = "") -> bool:
        """Stop producing; the stream then ends with reason ABORT.
        False when there was nothing left to cancel."""
        if self.cancel_requested or not self.producing:
            return False
        self.cancel_requested = True
        self.abort_reason = reason
        assert self._producer is not None
        self._producer.cancel()
        return True

    def fail(self, err: RbeeError) -> None:
        """End the stream with ``err`` (the engine died under it): the writer
        sends what it already has, then the error; the producer stops."""
        self._queue.put_nowait(err)
        if self._producer is not None and not self._producer.done():
            self._producer.cancel()

    def _take(self, delta: Delta, batches: dict[int, _Batch]) -> None:
        if delta.prompt_tokens:
            self.prompt_tokens = delta.prompt_tokens
        if delta.cached_tokens:
            self.cached_tokens = delta.cached_tokens
        if delta.queue_time_s is not None:
            self._queue_time_s = delta.queue_time_s
        if delta.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            self._pending_prompt_logprobs = delta.prompt_logprobs
        c = self._completions[delta.completion]
        if delta.token_ids or delta.text:
            b = batches.setdefault(delta.completion, _Batch())
            b.ids.extend(delta.token_ids)
            if delta.text:
                b.texts.append(delta.text)
            if delta.logprobs:
                b.logprobs.extend(delta.logprobs)
            if delta.token_ids:
                c.last_token = delta.token_ids[-1]
        if delta.finished and c.reason is None:
            c.reason = delta.finish_reason or STOP
            c.stop_reason = delta.stop_reason

    async def messages(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """TokenDelta messages, then exactly one GenerateFinal."""
        queue = self._queue
        while True:
            items = [queue.get_nowait() if not queue.empty() else await queue.get()]
            if self._coalesce:
                while not queue.empty():
                    items.append(queue.get_nowait())
            batches: dict[int, _Batch] = {}
            end: str | None = None
            error: BaseException | None = None
            for item in items:
                if isinstance(item, Delta):
                    self._take(item, batches)
                elif isinstance(item, _End):
                    end = end or item.reason
                else:
                    error = item
            for index, b in sorted(batches.items()):
                yield inference_pb2.GenerateResponse(delta=self._delta(index, b))
            if error is not None:
                if isinstance(error, RbeeError):
                    raise error
                raise internal_error(
                    error,
                    f"generation of {self.request_id}",
                    "The engine failed during generation",
                    {"request_id": self.request_id, "tokens_generated": self.tokens},
                ) from error
            if end is not None or all(c.reason is not None for c in self._completions):
                for c in self._completions:
                    if c.reason is None:
                        c.reason = end or STOP
                self.finish_reason = self._completions[0].reason
                yield inference_pb2.GenerateResponse(final=self.final())
                return

    def _delta(self, index: int, b: _Batch) -> inference_pb2.TokenDelta:
        if self._first_token is None:
            self._first_token = time.monotonic()
        c = self._completions[index]
        msg = inference_pb2.TokenDelta(
            index=c.tokens,
            text="".join(b.texts),
            token_ids=b.ids,
            completion=index,
            logprobs=logprobs_to_proto(b.logprobs),
        )
        if self._pending_prompt_logprobs is not None:
            msg.prompt_logprobs.extend(logprobs_to_proto(self._pending_prompt_logprobs))
            self._pending_prompt_logprobs = None
            self._prompt_logprobs_sent = True
        c.tokens += len(b.ids)
        self.tokens += len(b.ids)
        self._on_tokens(len(b.ids))
        msg.prompt_tokens = self.prompt_tokens
        msg.completion_tokens = self.tokens
        msg.cached_tokens = self.cached_tokens
        return msg

    def _end(self, i: int, c: _Completion) -> inference_pb2.CompletionEnd:
        reason = c.reason or ABORT
        end = inference_pb2.CompletionEnd(completion=i, reason=FINISH_REASONS[reason], tokens=c.tokens)
        if reason == STOP:
            set_matched_stop(end, c.stop_reason, c.last_token)
        return end

    def final(self) -> inference_pb2.GenerateFinal:
        now = time.monotonic()
        ttft = (self._first_token - self._started) if self._first_token is not None else 0.0
        reason = self.finish_reason or ABORT
        final = inference_pb2.GenerateFinal(
            reason=FINISH_REASONS[reason],
            tokens_generated=self.tokens,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            duration_ms=int((now - self._started) * 1000),
            time_to_first_token_ms=int(ttft * 1000),
            queue_time_ms=int(self._queue_time_s * 1000),
            request_id=self.request_id,
            completions=[self._end(i, c) for i, c in enumerate(self._completions)],
        )
        if reason == STOP:
            first = self._completions[0]
            set_matched_stop(final, first.stop_reason, first.last_token)
        if reason == ABORT:
            final.abort_reason = self.abort_reason
        return final

    async def stop(self) -> None:
        """Cancel the producer (if still running) and wait for it to end."""
        producer = self._producer
        if producer is None or producer.done():
            return
        producer.cancel()
        # wait() does not re-raise the producer's CancelledError, only ours.
        await asyncio.wait([producer])
