"""The worker's state machine and its observers.

loading → idle ⇄ busy → draining → stopped; loading → failed (load error);
idle/busy → failed (the engine died).
"Busy" means at least one request is in flight (the slots say how many more
fit), so "idle" is what the hive's idle timeout and warm-start look for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from rbee.errors import RbeeError
from rbee.fanout import Subscription
from rbee.narration import progress_event
from rbee.v1 import common_pb2
from rbee_worker.engine import EngineInfo, LoadProgress

log = logging.getLogger(__name__)

WS = common_pb2.WorkerState
LOADING = WS.WORKER_STATE_LOADING
IDLE = WS.WORKER_STATE_IDLE
BUSY = WS.WORKER_STATE_BUSY
DRAINING = WS.WORKER_STATE_DRAINING
FAILED = WS.WORKER_STATE_FAILED
STOPPED = WS.WORKER_STATE_STOPPED
# Updates one loading-progress subscriber may have unread before it is dropped.
SUBSCRIBER_LIMIT = 1000

_ALLOWED: dict[int, set[int]] = {
    LOADING: {IDLE, FAILED, DRAINING},
    # FAILED after loading: the engine died under the worker.
    IDLE: {BUSY, DRAINING, FAILED},
    BUSY: {IDLE, DRAINING, FAILED},
    DRAINING: {STOPPED},
    FAILED: {STOPPED, DRAINING},
    STOPPED: set(),
}


def state_name(state: int) -> str:
    return WS.Name(state).removeprefix("WORKER_STATE_").lower()


@dataclass(frozen=True)
class Identity:
    """What the worker is; fixed for its lifetime."""

    worker_id: str
    model_ref: str
    model_path: str
    backend: str
    device: int
    host: str
    port: int
    pid: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# Something StreamLoadingProgress subscribers receive.
Update = common_pb2.ProgressEvent | common_pb2.NarrationEvent | int


class WorkerStatus:
    """State, loading progress and the load error, with change notification."""

    def __init__(self) -> None:
        self.state: int = LOADING
        self.progress = progress_event("starting", 0, 0, unit="stages")
        self.error: RbeeError | None = None
        self.info: EngineInfo | None = None
        self._state_listeners: list[Callable[[int], None]] = []
        self._subscribers: set[Subscription[Update]] = set()

    # -- state ---------------------------------------------------------------

    def on_state(self, listener: Callable[[int], None]) -> None:
        self._state_listeners.append(listener)

    def set_state(self, new: int) -> bool:
        """Move to ``new`` if the machine allows it; listeners hear of real changes."""
        if new == self.state:
            return False
        if new not in _ALLOWED[self.state]:
            log.debug("ignored state change %s -> %s", state_name(self.state), state_name(new))
            return False
        self.state = new
        for listener in list(self._state_listeners):
            try:
                listener(new)
            except Exception:  # noqa: BLE001 - an observer must not break the worker
                log.exception("state listener failed")
        self._publish(new)
        return True

    @property
    def model_loaded(self) -> bool:
        return self.info is not None

    def loaded(self, info: EngineInfo) -> None:
        self.info = info
        self.set_state(IDLE)

    def failed(self, err: RbeeError) -> None:
        self.error = err
        self.set_state(FAILED)

    # -- progress ------------------------------------------------------------

    def set_progress(self, p: LoadProgress) -> None:
        self.progress = progress_event(p.stage, p.done, p.total, unit=p.unit, message=p.message)
        self._publish(self.progress)

    def narration(self, ev: common_pb2.NarrationEvent) -> None:
        if self.state == LOADING:
            self._publish(ev)

    # -- subscribers (StreamLoadingProgress) -----------------------------------

    def subscribe(self) -> Subscription[Update]:
        # Bounded: a subscriber that stops reading is dropped with SLOW_FOLLOWER.
        q: Subscription[Update] = Subscription(SUBSCRIBER_LIMIT, "loading-progress subscriber")
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: Subscription[Update]) -> None:
        self._subscribers.discard(q)

    def _publish(self, item: Update) -> None:
        for q in list(self._subscribers):
            q.offer(item)
