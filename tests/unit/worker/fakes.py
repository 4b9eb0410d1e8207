"""A scriptable Engine for the servicer's unit tests (no vLLM).

Each request is driven by ``FakeEngine.mode``:
- "fast": tokens as fast as the loop allows, ``burst`` tokens ready together
  (no await between them), then the loop is yielded to;
- "gated": one token per permit (``release(n)``), so a test holds requests in flight;
- "slow": one token every ``delay`` seconds;
- "hang": the engine never produces anything (stuck mid-step).
A request ends with "length" after max_tokens, or "stop" after ``stop_after``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from rbee.errors import RbeeError
from rbee_worker.engine import Delta, Engine, EngineInfo, LoadProgress, ProgressCallback, SamplingOptions

STAGES = ("tokenizer", "engine_start", "weights", "ready")


class FakeEngine(Engine):
    def __init__(
        self,
        mode: str = "fast",
        burst: int = 1,
        max_model_len: int = 64,
        stop_after: int | None = None,
        load_error: RbeeError | None = None,
        encode_error: RbeeError | None = None,
        hold_load: bool = False,
        delay: float = 0.01,
        die_after_requests: int | None = None,
    ) -> None:
        self.die_after_requests = die_after_requests
        self.mode = mode
        self.delay = delay
        self.burst = burst
        self.max_model_len = max_model_len
        self.stop_after = stop_after
        self.load_error = load_error
        self.encode_error = encode_error
        self.permits: asyncio.Semaphore | None = None
        self.load_gate = asyncio.Event()
        if not hold_load:
            self.load_gate.set()
        self.started: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.aborted_ids: list[str] = []
        self.aborted: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.options: dict[str, SamplingOptions] = {}
        self.encoded: list[tuple[str, bool]] = []
        self.shutdown_called = False

    def release(self, n: int = 1) -> None:
        if self.permits is None:
            self.permits = asyncio.Semaphore(0)
        for _ in range(n):
            self.permits.release()

    async def load(self, progress: ProgressCallback) -> EngineInfo:
        for i, stage in enumerate(STAGES[:-1]):
            progress(LoadProgress(stage, i, len(STAGES), f"fake {stage}"))
        await self.load_gate.wait()
        if self.load_error is not None:
            raise self.load_error
        progress(LoadProgress("ready", len(STAGES), len(STAGES), "fake ready"))
        return EngineInfo(max_model_len=self.max_model_len, engine_version="fake-1.0", max_num_seqs=8)

    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        if self.encode_error is not None:
            raise self.encode_error
        self.encoded.append((prompt, raw_prompt))
        # One token per word, plus two for a "chat template" unless raw.
        words = [100 + len(w) for w in prompt.split()]
        return words if raw_prompt else [1, 2, *words]

    async def generate(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        self.options[request_id] = options
        self.started[request_id].set()
        limit = options.max_tokens if self.stop_after is None else min(options.max_tokens, self.stop_after)
        reason = "length" if self.stop_after is None or options.max_tokens <= self.stop_after else "stop"
        n = 0
        prompt_tokens = len(prompt_token_ids)
        if self.mode == "hang":
            await asyncio.Event().wait()
        while n < limit:
            if self.mode == "gated":
                if self.permits is None:
                    self.permits = asyncio.Semaphore(0)
                await self.permits.acquire()
                step = 1
            else:
                step = min(self.burst, limit - n)
            for _ in range(step):
                n += 1
                yield Delta(
                    token_ids=[1000 + n],
                    text=f"t{n} ",
                    finished=n == limit,
                    finish_reason=reason if n == limit else None,
                    prompt_tokens=prompt_tokens,
                )
            if self.mode == "fast":
                await asyncio.sleep(0)
            elif self.mode == "slow":
                await asyncio.sleep(self.delay)

    async def abort(self, request_id: str) -> None:
        self.aborted_ids.append(request_id)
        self.aborted[request_id].set()

    async def health(self) -> None:
        if self.die_after_requests is not None and len(self.options) >= self.die_after_requests:
            raise RbeeError("INTERNAL", "fake engine process died")

    async def shutdown(self) -> None:
        self.shutdown_called = True
