"""Keep-alive: how long an idle worker stays loaded (docs/queen.md, "Idle
memory"), with Ollama's semantics: a duration ("5m", "30s", a number of
seconds), 0 = stop it once this request is answered, negative = never.

Whose keep-alive counts: the request's own, else the model's (set at deploy:
``set_model_keep_alive``), else the cluster default (``--keep-alive``, 5m).
Each request sets its worker's keep-alive and extends its deadline; the last
request's value wins, as in Ollama.

The queen sees a request two ways. Through the front door it runs the request
itself (``begin``/``end``). Through the task API it only hands the worker out
(``handed``): the request then runs between the keeper and the worker, and the
queen learns of it from the registry, which sees every change its hive
reports (``observe``): the worker busy after the hand-out means its client
came; idle again afterwards, it is done. A handed-out worker whose client has
not shown up within ``HANDOFF_GRACE_S`` counts as idle again.

When a worker's deadline has passed and it is idle (no request of the queen's
on it, IDLE with every slot free in the registry), the queen stops it through
its hive (ShutdownWorker) and says so in one narration line. A worker the
queen never handed out follows the cluster default from its last activity.
A worker marked as needed (``needed``, e.g. for a replica count) is never
stopped here nor evicted (rbee_queen/eviction.py).

With idle sleep on (``--idle-sleep``: a ``sleep`` callable given), an expired
CUDA worker is put to sleep through its hive (SleepWorker: vLLM's sleep mode,
level 1) instead: its GPU memory is freed, its weights wait in CPU memory, and
its next request wakes it. It is then left alone until it is used again (a
request of the queen's, a hand-out, or its hive reporting it busy). Where it
cannot sleep (SLEEP_MODE_UNSUPPORTED, or any other failure but WORKER_BUSY),
it is stopped as without the setting, and the narration says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rbee.backends import backend_name
from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref
from rbee.v1 import common_pb2

log = logging.getLogger(__name__)
State = common_pb2.WorkerState

NEVER = math.inf
# How long a worker handed out by the task API waits for its client's request.
HANDOFF_GRACE_S = 60.0
# A stop that failed is tried again after this long.
RETRY_STOP_S = 30.0
# Upper bound of a keep-alive that is not "never" (about 10 years).
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0

# Go-style durations as Ollama reads them: "5m", "1h30m", "300ms", "-1m", "1.5h".
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _invalid(value: Any, field: str) -> RbeeError:
    return RbeeError(
        "INVALID_KEEP_ALIVE",
        f"{field} must be a duration such as \"5m\", \"30s\" or \"1h30m\", a number of seconds, 0 (stop after this "
        f"request) or -1 (never stop); got {str(value)[:40]!r}",
        {"field": field, "value": str(value)[:40]},
        ["Pass --keep-alive 5m (or 0, or -1)"],
    )


def parse_keep_alive(value: Any, field: str = "keep_alive") -> float | None:
    """Seconds (``NEVER`` for a negative value); None when not given ("" or None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise _invalid(value, field)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # a bare number: seconds
        except ValueError:
            parts = _PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise _invalid(value, field) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise _invalid(value, field)
    if math.isnan(seconds):
        raise _invalid(value, field)
    if seconds < 0:
        return NEVER
    if seconds > MAX_KEEP_ALIVE_S:
        return NEVER
    return seconds


def _model_key(model: str) -> str:
    try:
        return str(parse_model_ref(model))
    except RbeeError:
        return model


def _busy(worker: common_pb2.WorkerInfo) -> bool:
    return worker.state == State.WORKER_STATE_BUSY or (
        worker.state == State.WORKER_STATE_IDLE and worker.slots_available < worker.slots_total)


def describe(seconds: float) -> str:
    """A keep-alive or idle time as people write it: "never", "0s", "4m", "1h5m", "90ms"."""
    if seconds == NEVER:
        return "never"
    if 0 < seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec or not (h or m) else "")
    return out


@dataclass
class Held:
    """What the queen knows of one worker's keep-alive."""

    node: str
    worker_id: str
    model: str
    keep_s: float
    # Monotonic time of the last request's end (or hand-out); the deadline counts from it.
    last_used: float
    # Requests of the front door on it now.
    in_flight: int = 0
    # A task API hand-out whose request has not ended yet (unix ms, monotonic),
    # and whether the worker was seen busy since.
    handed_unix_ms: int = 0
    handed_at: float = 0.0
    came: bool = False
    # Seen in the registry (a worker that leaves it afterwards is forgotten).
    seen: bool = False
    stopping: bool = False
    retry_at: float = 0.0
    # The registry's word on its backend; put to sleep by idle sleep and not used since.
    backend: str = ""
    asleep: bool = False


Stopper = Callable[[str, str], Awaitable[Any]]
# Puts a worker to sleep through its hive (node, worker id); raises RbeeError when it cannot.
Sleeper = Callable[[str, str], Awaitable[Any]]


class KeepAlive:
    """Keep-alive bookkeeping and the stopper of expired idle workers."""

    def __init__(self, default_s: float, registry: Any, stop: Stopper, narrate: Callable[..., Any],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 sleep: Sleeper | None = None) -> None:  # fmt: skip
        self.default_s = default_s
        self.registry = registry
        self._stop = stop
        # Idle sleep (None = off): CUDA workers are put to sleep rather than stopped.
        self._sleep = sleep
        self.narrate = narrate
        self.clock = clock
        self.wall = wall
        self.held: dict[str, Held] = {}
        self._models: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stops: set[asyncio.Task] = set()
        # (node, worker) -> True for a worker that must stay (a deployment's replica).
        self.needed: Callable[[str, common_pb2.WorkerInfo], bool] | None = None

    # -- what decides the keep-alive ---------------------------------------------

    def set_model_keep_alive(self, model: str, seconds: float | None) -> None:
        """The keep-alive of ``model``'s workers when a request names none
        (a deployment's; None = back to the cluster default)."""
        if seconds is None:
            self._models.pop(_model_key(model), None)
        else:
            self._models[_model_key(model)] = seconds
        self._wake.set()

    def keep_for(self, model: str, requested: float | None) -> float:
        if requested is not None:
            return requested
        return self._models.get(_model_key(model), self.default_s)

    def _hold(self, node: str, worker_id: str, model: str, requested: float | None) -> Held:
        keep = self.keep_for(model, requested)
        held = self.held.get(worker_id)
        if held is None:
            held = self.held[worker_id] = Held(node, worker_id, model, keep, self.clock())
        held.node, held.model, held.keep_s = node, model, keep
        held.stopping = held.asleep = False
        self._wake.set()
        return held

    # -- what the queen sees of requests -----------------------------------------

    def begin(self, node: str, worker_id: str, model: str, requested: float | None = None) -> None:
        """A front-door request starts on the worker."""
        held = self._hold(node, worker_id, model, requested)
        held.in_flight += 1
        held.last_used = self.clock()
        held.handed_unix_ms = 0  # the queen runs this request itself: it sees its end

    def end(self, node: str, worker_id: str, model: str, requested: float | None = None) -> None:
        """A front-door request on the worker is over: its keep-alive counts from now."""
        held = self._hold(node, worker_id, model, requested)
        held.in_flight = max(0, held.in_flight - 1)
        held.last_used = self.clock()

    @contextlib.contextmanager
    def request(self, node: str, worker_id: str, model: str, requested: float | None = None) -> Iterator[None]:
        """A front-door request on the worker, from its start to its end."""
        self.begin(node, worker_id, model, requested)
        try:
            yield
        finally:
            self.end(node, worker_id, model, requested)

    def handed(self, node: str, worker_id: str, model: str, requested: float | None = None) -> None:
        """The task API handed the worker to a client that calls it directly."""
        held = self._hold(node, worker_id, model, requested)
        held.last_used = held.handed_at = self.clock()
        held.handed_unix_ms = int(self.wall() * 1000)
        held.came = False

    def observe(self, node: str, worker: common_pb2.WorkerInfo) -> None:
        """One worker entry the registry applied (ClusterWorkers.observers)."""
        held = self.held.get(worker.id)
        if held is not None and _busy(worker) and (held.handed_unix_ms or held.asleep):
            if held.handed_unix_ms:
                held.came = True
            held.asleep = False  # a request woke it
            self._wake.set()

    def is_needed(self, node: str, worker: common_pb2.WorkerInfo) -> bool:
        if self.needed is None:
            return False
        try:
            return bool(self.needed(node, worker))
        except Exception:  # noqa: BLE001 - a broken marker keeps the worker
            log.exception("the needed-marker failed for %s", worker.id)
            return True

    def in_use(self, worker_id: str) -> bool:
        """A request of the queen's runs on it, or a hand-out waits for its client."""
        held = self.held.get(worker_id)
        if held is None:
            return False
        return held.in_flight > 0 or (held.handed_unix_ms > 0 and self.clock() - held.handed_at < HANDOFF_GRACE_S)

    def idle_since(self, worker: common_pb2.WorkerInfo) -> float:
        """Monotonic time the worker was last used, by the queen's word or its hive's."""
        activity = self.clock() - max(0.0, self.wall() - worker.last_activity_unix_ms / 1000) if worker.last_activity_unix_ms else 0.0
        held = self.held.get(worker.id)
        return max(activity, held.last_used) if held is not None else activity

    # -- the decision ----------------------------------------------------------------

    def _idle(self, held: Held | None, worker: common_pb2.WorkerInfo) -> bool:
        if held is not None and held.handed_unix_ms and _busy(worker):
            held.came = True
        if worker.state != State.WORKER_STATE_IDLE or worker.slots_available < worker.slots_total:
            return False
        if held is None:
            return True
        if held.in_flight > 0:
            return False
        if held.handed_unix_ms:
            if held.came or self.clock() - held.handed_at >= HANDOFF_GRACE_S:
                held.handed_unix_ms = 0  # its client came (and went), or never will
            else:
                return False
        return True

    def due(self) -> tuple[list[tuple[Held, float]], float | None]:
        """(workers to stop now with how long each was idle, the next time to look)."""
        now = self.clock()
        live: dict[str, tuple[str, common_pb2.WorkerInfo]] = {}
        for cw in self.registry.list():
            live[cw.worker.id] = (cw.node, cw.worker)
        for wid, held in list(self.held.items()):
            if wid in live:
                held.seen = True
            elif held.seen and not held.stopping:
                del self.held[wid]  # gone (stopped, crashed, its node removed)
        stop: list[tuple[Held, float]] = []
        next_at: float | None = None
        for wid, (node, worker) in live.items():
            held = self.held.get(wid)
            if held is not None:
                held.backend = backend_name(worker.backend)
                if held.asleep and _busy(worker):
                    held.asleep = False
            if held is not None and (held.stopping or held.asleep or held.retry_at > now):
                if held.retry_at > now:
                    next_at = held.retry_at if next_at is None else min(next_at, held.retry_at)
                continue
            keep = held.keep_s if held is not None else self.keep_for(worker.model_ref, None)
            if keep == NEVER or not self._idle(held, worker) or self.is_needed(node, worker):
                if held is not None and held.handed_unix_ms:
                    at = held.handed_at + HANDOFF_GRACE_S
                    next_at = at if next_at is None else min(next_at, at)
                continue
            since = self.idle_since(worker)
            deadline = since + keep
            if deadline <= now:
                if held is None:
                    held = self.held[wid] = Held(node, wid, worker.model_ref, keep, since, seen=True, backend=backend_name(worker.backend))
                stop.append((held, now - since))
            else:
                next_at = deadline if next_at is None else min(next_at, deadline)
        return stop, next_at

    # -- the stopper -------------------------------------------------------------------

    def start(self) -> None:
        observers = getattr(self.registry, "observers", None)
        if observers is not None:
            observers.append(self.observe)
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        for task in [self._task, *self._stops]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _run(self) -> None:
        with self.registry.listen() as changed:
            while True:
                # Cleared before looking, so a change while it looks wakes the next round.
                changed.clear()
                self._wake.clear()
                try:
                    stop, next_at = self.due()
                except Exception:  # noqa: BLE001 - the stopper must keep going
                    log.exception("keep-alive round failed")
                    stop, next_at = [], self.clock() + RETRY_STOP_S
                for held, idle_s in stop:
                    held.stopping = True
                    task = asyncio.ensure_future(self._expire(held, idle_s))
                    self._stops.add(task)
                    task.add_done_callback(self._stops.discard)
                wait = None if next_at is None else max(0.05, next_at - self.clock())
                waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(self._wake.wait())]
                try:
                    await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    async def _expire(self, held: Held, idle_s: float) -> None:
        sleep = self._sleep is not None and held.backend == "cuda"
        self.narrate("⏲️", f"Keep-alive of worker {held.worker_id} ({held.model}) on {held.node} ran out "
                     f"(keep-alive {describe(held.keep_s)}, idle {describe(idle_s)}): "
                     f"{'putting it to sleep' if sleep else 'stopping it'}")  # fmt: skip
        if sleep and await self._put_to_sleep(held):
            return
        try:
            await self._stop(held.node, held.worker_id)
        except RbeeError as err:
            if err.code == "WORKER_NOT_FOUND":
                self.held.pop(held.worker_id, None)
                return
            self.narrate("⚠️", f"Could not stop worker {held.worker_id} on {held.node}: {err.code}: {err.message}", "warn")
            held.stopping = False
            held.retry_at = self.clock() + RETRY_STOP_S
            self._wake.set()
            return
        self.held.pop(held.worker_id, None)
        self.narrate("💤", f"Worker {held.worker_id} ({held.model}) on {held.node} stopped: its memory is free")

    async def _put_to_sleep(self, held: Held) -> bool:
        """Idle sleep: True when the worker sleeps now or was used meanwhile
        (nothing more to do); False when it must be stopped instead."""
        assert self._sleep is not None
        try:
            await self._sleep(held.node, held.worker_id)
        except RbeeError as err:
            if err.code == "WORKER_NOT_FOUND":
                self.held.pop(held.worker_id, None)
                return True
            if err.code == "WORKER_BUSY":  # a request came first: its keep-alive starts over
                held.stopping = False
                held.last_used = self.clock()
                self._wake.set()
                return True
            self.narrate("⚠️", f"Worker {held.worker_id} on {held.node} cannot sleep ({err.code}: {err.message}): "
                         "stopping it instead", "warn")  # fmt: skip
            return False
        held.stopping, held.asleep = False, True
        self.narrate("💤", f"Worker {held.worker_id} ({held.model}) on {held.node} put to sleep: "
                     "its GPU memory is free until the next request")  # fmt: skip
        return True
