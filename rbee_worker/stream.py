"""One generation in flight: the engine feeds a queue, the gRPC writer drains it.

A producer task pulls deltas from the engine into a queue; the writer takes
everything that is ready and sends it as ONE TokenDelta. While a message is
being written the engine keeps producing, so under load each message carries
several tokens and the stream is not capped by gRPC's per-message cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rbee.errors import RbeeError
from rbee.rpc import internal_error
from rbee.v1 import inference_pb2
from rbee_worker.engine import CANCELLED, STOP, Delta, Engine, SamplingOptions


@dataclass(frozen=True)
class _End:
    reason: str


class ActiveRequest:
    def __init__(
        self,
        request_id: str,
        engine: Engine,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        coalesce: bool = True,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = len(prompt_token_ids)
        self.max_tokens = options.max_tokens
        self.tokens = 0
        self.finish_reason: str | None = None
        self.cancel_requested = False
        self._engine = engine
        self._prompt = prompt_token_ids
        self._options = options
        self._coalesce = coalesce
        self._queue: asyncio.Queue[Delta | _End | BaseException] = asyncio.Queue()
        self._producer: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._first_token: float | None = None

    def start(self) -> None:
        self._started = time.monotonic()
        self._producer = asyncio.get_running_loop().create_task(self._produce(), name=f"generate-{self.request_id}")

    @property
    def producing(self) -> bool:
        return self._producer is not None and not self._producer.done()

    async def _produce(self) -> None:
        put = self._queue.put_nowait
        try:
            async for delta in self._engine.generate(self.request_id, self._prompt, self._options):
                put(delta)
                if delta.finished:
                    return
            put(_End(STOP))
        except asyncio.CancelledError:
            put(_End(CANCELLED))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the writer, which reports it
            put(exc)

    def cancel(self) -> bool:
        """Stop producing; the stream then ends with finish_reason "cancelled".
        False when there was nothing left to cancel."""
        if self.cancel_requested or not self.producing:
            return False
        self.cancel_requested = True
        assert self._producer is not None
        self._producer.cancel()
        return True

    async def messages(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """TokenDelta messages, then exactly one GenerateFinal."""
        queue = self._queue
        index = 0
        while True:
            items = [queue.get_nowait() if not queue.empty() else await queue.get()]
            if self._coalesce:
                while not queue.empty():
                    items.append(queue.get_nowait())
            ids: list[int] = []
            texts: list[str] = []
            end: str | None = None
            error: BaseException | None = None
            for item in items:
                if isinstance(item, Delta):
                    ids.extend(item.token_ids)
                    if item.text:
                        texts.append(item.text)
                    if item.prompt_tokens:
                        self.prompt_tokens = item.prompt_tokens
                    if item.finished:
                        end = item.finish_reason or STOP
                elif isinstance(item, _End):
                    end = end or item.reason
                else:
                    error = item
            if ids or texts:
                if self._first_token is None:
                    self._first_token = time.monotonic()
                yield inference_pb2.GenerateResponse(
                    delta=inference_pb2.TokenDelta(index=index, text="".join(texts), token_ids=ids)
                )
                index += len(ids)
                self.tokens = index
            if error is not None:
                if isinstance(error, RbeeError):
                    raise error
                raise internal_error(
                    error,
                    f"generation of {self.request_id}",
                    "The engine failed during generation",
                    {"request_id": self.request_id, "tokens_generated": index},
                ) from error
            if end is not None:
                self.finish_reason = end
                yield inference_pb2.GenerateResponse(final=self.final())
                return

    def final(self) -> inference_pb2.GenerateFinal:
        now = time.monotonic()
        ttft = (self._first_token - self._started) if self._first_token is not None else 0.0
        return inference_pb2.GenerateFinal(
            finish_reason=self.finish_reason or CANCELLED,
            tokens_generated=self.tokens,
            prompt_tokens=self.prompt_tokens,
            duration_ms=int((now - self._started) * 1000),
            time_to_first_token_ms=int(ttft * 1000),
            request_id=self.request_id,
        )

    async def stop(self) -> None:
        """Cancel the producer (if still running) and wait for it to end."""
        producer = self._producer
        if producer is None or producer.done():
            return
        producer.cancel()
        # wait() does not re-raise the producer's CancelledError, only ours.
        await asyncio.wait([producer])
