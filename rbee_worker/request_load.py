"""The load requests put on the worker: slots, the engine's queue and recent
token throughput (GetLoad, WorkerInfo.load). Loading the model is another
matter: its stages are in loading_stages.py."""

from __future__ import annotations

import time
from collections import deque

from rbee.v1 import common_pb2
from rbee_worker.engine import EngineLoad

WINDOW_S = 10


class TokenRate:
    """Tokens sent per second over the last `window_s` seconds (monotonic
    clock; one bucket per second, so memory stays fixed)."""

    def __init__(self, window_s: int = WINDOW_S, clock=time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, tokens]

    def add(self, tokens: int) -> None:
        second = int(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([second, tokens])
        self._trim(second)

    def _trim(self, now_s: int) -> None:
        while self._buckets and self._buckets[0][0] <= now_s - self.window_s:
            self._buckets.popleft()

    def rate(self) -> float:
        self._trim(int(self._clock()))
        return sum(tokens for _, tokens in self._buckets) / self.window_s


def worker_load(slots_total: int, slots_busy: int, rate: TokenRate, engine: EngineLoad | None) -> common_pb2.WorkerLoad:
    # Without the engine's own figures, every admitted request counts as running.
    running = engine.running if engine else slots_busy
    return common_pb2.WorkerLoad(
        running_requests=running,
        waiting_requests=engine.waiting if engine else 0,
        slots_total=slots_total,
        slots_busy=slots_busy,
        kv_cache_usage=engine.kv_cache_usage if engine else 0.0,
        generation_tokens_per_s=rate.rate(),
        window_ms=rate.window_s * 1000,
        # Wall-clock on purpose: a timestamp for the listings.
        unix_ms=int(time.time() * 1000),
    )
