"""Sleep mode (docs/queen.md, "Idle memory"): an idle worker on CUDA frees
its GPU memory without stopping: vLLM's sleep level 1 moves the weights to
CPU memory and drops the KV cache; the next request wakes it (weights back,
KV cache rebuilt) in well under a second, instead of a full load.

vLLM offers it on CUDA only, and only for an engine started with sleep mode
on (it then allocates GPU memory through its own pool): a worker runs its
engine that way when ``RBEE_WORKER_SLEEP_MODE=1`` is in its environment.
Elsewhere (the CPU backend, an engine without it) Sleep fails at once with
SLEEP_MODE_UNSUPPORTED, before the engine is touched.

A worker with requests running refuses to sleep (WORKER_BUSY): vLLM's sleep
would abort them. Sleep and wake take one lock, and Generate wakes the engine
under it after taking its slot, so a request never reaches a sleeping engine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from rbee.errors import RbeeError
from rbee.rpc import handle_errors
from rbee.v1 import inference_pb2

ENV_SLEEP_MODE = "RBEE_WORKER_SLEEP_MODE"
LEVEL = 1


def sleep_mode_wanted(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_SLEEP_MODE, "") == "1"


def unsupported(backend: str, reason: str) -> RbeeError:
    return RbeeError(
        "SLEEP_MODE_UNSUPPORTED",
        f"This worker cannot sleep: {reason}",
        {"backend": backend},
        ["Stop the idle worker instead: `rbee-keeper workers shutdown --id ID`"]
        + ([f"Start workers with {ENV_SLEEP_MODE}=1 in their environment (CUDA only)"] if backend == "cuda" else []),
    )


class SleepControl:
    """The worker's sleep state around one engine."""

    def __init__(self, engine: Any, backend: str, busy: Callable[[], int], narrate: Callable[..., Any]) -> None:
        self.engine = engine
        self.backend = backend
        self._busy = busy
        self._narrate = narrate
        self.level = 0
        self._lock = asyncio.Lock()

    @property
    def sleeping(self) -> bool:
        return self.level > 0

    def check(self) -> None:
        """SLEEP_MODE_UNSUPPORTED unless this worker's engine can sleep."""
        if self.backend != "cuda":
            raise unsupported(self.backend, f"vLLM has sleep mode on CUDA only, and this worker runs on {self.backend}")
        reason = self.engine.sleep_unsupported()
        if reason:
            raise unsupported(self.backend, reason)

    async def sleep(self, level: int = 0) -> int:
        level = level or LEVEL
        self.check()
        if level != LEVEL:
            raise RbeeError("INVALID_ARGUMENT", f"Sleep level {level} is not offered: only level {LEVEL} (weights kept in CPU memory)",
                            {"field": "level", "value": str(level)})  # fmt: skip
        async with self._lock:
            if self.sleeping:
                return self.level
            busy = self._busy()
            if busy:
                raise RbeeError("WORKER_BUSY", f"{busy} request(s) run on this worker: it sleeps only when idle",
                                {"slots_busy": str(busy)}, ["Ask again once its requests are done"])  # fmt: skip
            await self.engine.sleep(level)
            self.level = level
        self._narrate("😴", f"Asleep (level {level}): weights in CPU memory, KV cache dropped; the next request wakes it")
        return level

    async def wake(self, why: str = "asked to") -> bool:
        """Wake the engine if it sleeps; whether it did."""
        if not self.sleeping:
            return False
        async with self._lock:
            if not self.sleeping:
                return False
            await self.engine.wake_up()
            self.level = 0
        self._narrate("☀️", f"Awake again ({why})")
        return True


class SleepRpcs:
    """The worker's Sleep and WakeUp RPCs (InferenceServicer's), around its ``sleep`` control."""

    sleep: SleepControl

    @handle_errors
    async def Sleep(self, request: inference_pb2.SleepRequest, context) -> inference_pb2.SleepResponse:
        self.sleep.check()
        if self._status.info is None:  # type: ignore[attr-defined]
            self._check_accepting()  # type: ignore[attr-defined]
            raise RbeeError("MODEL_LOADING", "The model is not loaded yet: nothing to put to sleep")
        level = await self.sleep.sleep(request.level)
        return inference_pb2.SleepResponse(sleeping=True, level=level)

    @handle_errors
    async def WakeUp(self, request: inference_pb2.WakeUpRequest, context) -> inference_pb2.WakeUpResponse:
        self.sleep.check()
        return inference_pb2.WakeUpResponse(was_sleeping=await self.sleep.wake())
