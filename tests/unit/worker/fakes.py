"""A scriptable Engine for the servicer's unit tests (no vLLM).

Each request is driven by ``FakeEngine.mode``:
- "fast": tokens as fast as the loop allows, ``burst`` tokens ready together
  (no await between them), then the loop is yielded to;
- "gated": one token per permit (``release(n)``), so a test holds requests in flight;
- "slow": one token every ``delay`` seconds;
- "hang": the engine never produces anything (stuck mid-step);
- "engine": like a real engine, steps run on their own (one every ``delay``
  seconds) whether or not anyone reads them, until abort() or the end; the
  steps taken are counted per request in ``steps``.
A request ends with "length" after max_tokens, or "stop" after ``stop_after``
(the matched stop is ``stop_reason``: a stop string, a token id, or None for EOS).
Token k (1-based) of completion c is id 1000 + k + 100 * c, text "t{k} ".
With logprobs K: the chosen token has logprob -0.1 * k and rank 1; the top K
are the chosen one and K-1 others with lower logprobs.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from rbee.errors import RbeeError
from rbee_worker.engine import (
    Delta,
    Engine,
    EngineInfo,
    EngineLoad,
    LoadProgress,
    PositionLogprobs,
    ProgressCallback,
    SamplingOptions,
    TokenLogprob,
)

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
        death: RbeeError | None = None,
        stop_reason: str | int | None = None,
        info: dict | None = None,
    ) -> None:
        self.stop_reason = stop_reason
        self.info_fields = info or {}
        self.steps: dict[str, int] = defaultdict(int)
        self.chats: list[list[dict]] = []
        self.engine_load: EngineLoad | None = None
        self.die_after_requests = die_after_requests
        # With die_after_requests: the engine's processes "die" with this error
        # (on_death listeners hear it, health raises it) once that many requests ended.
        self.death = death
        self.death_listeners: list = []
        self._dead: RbeeError | None = None
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
        self._cores: set[asyncio.Task] = set()

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
        fields = dict(
            max_model_len=self.max_model_len, engine_version="fake-1.0", max_num_seqs=8, vocab_size=5000,
            eos_token_ids=(2,), bos_token_id=1, has_chat_template=True, tokenizer_sha256="ab" * 32,
        )
        fields.update(self.info_fields)
        return EngineInfo(**fields)

    def encode(self, prompt: str, raw_prompt: bool) -> list[int]:
        if self.encode_error is not None:
            raise self.encode_error
        self.encoded.append((prompt, raw_prompt))
        # One token per word, plus two for a "chat template" unless raw.
        words = [100 + len(w) for w in prompt.split()]
        return words if raw_prompt else [1, 2, *words]

    def encode_chat(self, messages) -> list[int]:
        self.chats.append([dict(m) for m in messages])
        # Two template tokens per message, one per word, and two for the generation prompt.
        ids: list[int] = []
        for m in messages:
            ids += [3, 4, *[100 + len(w) for w in m["content"].split()]]
        return [*ids, 5, 6]

    def load_stats(self) -> EngineLoad | None:
        return self.engine_load

    @staticmethod
    def _logprobs(token_id: int, k: int, n: int) -> PositionLogprobs:
        chosen = TokenLogprob(token_id, -0.1 * n, 1, f"t{n}")
        others = tuple(TokenLogprob(token_id + 500 + j, -0.1 * n - j, 1 + j, f"o{j}") for j in range(1, k))
        return PositionLogprobs(chosen, (chosen, *others)[:k] if k else ())

    def _delta(self, options: SamplingOptions, prompt: list[int], c: int, n: int, last: bool, reason: str, first: bool) -> Delta:
        token_id = 1000 + n + 100 * c
        return Delta(
            token_ids=[token_id],
            text=f"t{n} ",
            finished=last,
            finish_reason=reason if last else None,
            stop_reason=self.stop_reason if last and reason == "stop" else None,
            prompt_tokens=len(prompt),
            completion=c,
            cached_tokens=1,
            logprobs=[self._logprobs(token_id, options.logprobs, n)] if options.logprobs is not None else None,
            prompt_logprobs=(
                [None, *(self._logprobs(t, options.prompt_logprobs, 1) for t in prompt[1:])]
                if first and options.prompt_logprobs is not None else None
            ),
            queue_time_s=0.002 if first else None,
        )

    async def generate(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        if self.mode == "engine":
            async for d in self._engine_loop(request_id, prompt_token_ids, options):
                yield d
            return
        if options.n > 1:
            # Completions interleave token by token, as a batching engine's do.
            self.options[request_id] = options
            self.started[request_id].set()
            limit = options.max_tokens
            for n in range(1, limit + 1):
                for c in range(options.n):
                    yield self._delta(options, prompt_token_ids, c, n, n == limit, "length", n == 1 and c == 0)
                await asyncio.sleep(0)
            return
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
                if n == limit:
                    self._maybe_die()
                yield self._delta(options, prompt_token_ids, 0, n, n == limit, reason, n == 1)
            if self.mode == "fast":
                await asyncio.sleep(0)
            elif self.mode == "slow":
                await asyncio.sleep(self.delay)

    async def _engine_loop(self, request_id: str, prompt: list[int], options: SamplingOptions) -> AsyncIterator[Delta]:
        """Steps run in their own task, like an engine core: they go on until
        abort() reaches the engine, read or not."""
        self.options[request_id] = options
        self.started[request_id].set()
        out: asyncio.Queue[Delta | None] = asyncio.Queue()

        async def core() -> None:
            for n in range(1, options.max_tokens + 1):
                await asyncio.sleep(self.delay)
                if self.aborted[request_id].is_set():
                    break
                self.steps[request_id] += 1
                out.put_nowait(self._delta(options, prompt, 0, n, n == options.max_tokens, "length", n == 1))
            out.put_nowait(None)

        task = asyncio.get_running_loop().create_task(core())
        self._cores.add(task)
        task.add_done_callback(self._cores.discard)
        while (d := await out.get()) is not None:
            yield d

    async def steps_ended(self) -> None:
        """Until every request's steps have stopped ("engine" mode): after this,
        ``steps`` cannot grow for any request started so far."""
        while self._cores:
            await asyncio.wait(set(self._cores))

    async def abort(self, request_id: str) -> None:
        self.aborted_ids.append(request_id)
        self.aborted[request_id].set()

    def _maybe_die(self) -> None:
        n = self.die_after_requests
        if self.death is not None and n is not None and len(self.options) >= n and self._dead is None:
            # Just after this request's final has gone out.
            asyncio.get_running_loop().call_later(0.05, self.die, self.death)

    def on_death(self, listener) -> None:
        self.death_listeners.append(listener)

    def die(self, err: RbeeError) -> None:
        """The engine's processes are gone: tell the listeners, as VllmEngine's watch does."""
        self._dead = err
        for listener in list(self.death_listeners):
            listener(err)

    async def health(self) -> None:
        if self._dead is not None:
            raise RbeeError(self._dead.code, self._dead.message, self._dead.details, self._dead.suggestions)
        if self.death is None and self.die_after_requests is not None and len(self.options) >= self.die_after_requests:
            raise RbeeError("INTERNAL", "fake engine process died")

    async def shutdown(self) -> None:
        self.shutdown_called = True
