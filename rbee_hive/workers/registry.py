"""The hive's local worker registry (S6.1): in memory, filled by the workers'
ready callbacks, lost when the hive restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rbee.auth import new_api_key
from rbee.backends import backend_enum
from rbee.errors import RbeeError
from rbee.v1 import common_pb2

from rbee_hive.workers.events import EventLog
from rbee_hive.workers.feed import HEARTBEAT_S, ChangeFeed
from rbee_hive.workers.process import WorkerProcess

State = common_pb2.WorkerState
ACTIVE_STATES = (State.WORKER_STATE_BUSY,)
READY_STATES = (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY)


def state_name(state: int) -> str:
    return common_pb2.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower()


@dataclass
class WorkerRecord:
    id: str
    host: str
    port: int
    model_ref: str
    model_path: str
    backend: str
    device: int
    api_key: str
    callback_key: str
    log_path: Path
    events: EventLog
    process: WorkerProcess | None = None
    # The worker's admin key (its Shutdown): only the hive holds it, so the
    # inference key handed to a keeper cannot stop the worker (S13).
    admin_key: str = field(default_factory=new_api_key, repr=False)
    state: int = State.WORKER_STATE_LOADING
    slots_total: int = 0
    slots_available: int = 0
    # Liveness and idleness use the monotonic clock; the wall clock is for display.
    last_activity: float = field(default_factory=time.monotonic)
    last_activity_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    # When the hive spawned it (display: a worker's age).
    started_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    ready: bool = False
    health_failures: int = 0
    stopping: bool = False
    # Its idle time is the queen's keep-alive's to judge (StartWorkerRequest.queen_keep_alive):
    # the hive's idle timeout leaves it be.
    queen_keep_alive: bool = False
    # What the worker reported when its loading failed.
    failure: RbeeError | None = None
    # The worker's load as it last reported it (None before its first report of it).
    load: common_pb2.WorkerLoad | None = None
    # Set by the first callback: the spawn is waiting for it.
    called_back: asyncio.Event = field(default_factory=asyncio.Event)
    # The folder of the worker's certificate and key (mutual TLS), if any.
    tls_dir: Path | None = None
    # The cores the hive gave it (rbee_hive/workers/cores.py; "" = not restricted),
    # and what the worker reports of its engine: dtype, why, OpenMP threads.
    cpu_set: str = ""
    dtype: str = ""
    dtype_reason: str = ""
    cpu_threads: int = 0
    # The identity name its certificate carries (rbee/tls_identity.py), if any.
    tls_name: str = ""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def touch(self) -> None:
        self.last_activity = time.monotonic()
        self.last_activity_unix_ms = int(time.time() * 1000)

    def to_proto(self) -> common_pb2.WorkerInfo:
        return common_pb2.WorkerInfo(
            id=self.id,
            address=self.address,
            model_ref=self.model_ref,
            model_path=self.model_path,
            backend=backend_enum(self.backend),
            device=self.device,
            state=self.state,
            slots_total=self.slots_total,
            slots_available=self.slots_available,
            last_activity_unix_ms=self.last_activity_unix_ms,
            pid=self.pid,
            load=self.load,
            tls=self.tls_dir is not None,
            tls_name=self.tls_name,
            dtype=self.dtype,
            dtype_reason=self.dtype_reason,
            cpu_set=self.cpu_set,
            cpu_threads=self.cpu_threads,
            started_unix_ms=self.started_unix_ms,
        )


class Registry:
    def __init__(self, heartbeat_s: float = HEARTBEAT_S) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        # Set on every change, so the idle timer sleeps until something happens.
        self.changed = asyncio.Event()
        # Every change as a stream with a resume point (WatchWorkers).
        self.feed = ChangeFeed(lambda: [w.to_proto() for w in self._workers.values()], heartbeat_s)

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def add(self, record: WorkerRecord) -> None:
        self._workers[record.id] = record
        self.changed.set()
        self.feed.upsert(record.to_proto())

    def updated(self, record: WorkerRecord) -> None:
        """A registered worker's state, slots or activity changed."""
        self.changed.set()
        if record.id in self._workers:
            self.feed.upsert(record.to_proto())

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def remove(self, worker_id: str) -> WorkerRecord | None:
        record = self._workers.pop(worker_id, None)
        self.changed.set()
        if record is not None:
            self.feed.removed(worker_id)
        return record

    def all(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def list(self, model_ref: str = "", state: int = State.WORKER_STATE_UNSPECIFIED) -> list[WorkerRecord]:
        return [
            w
            for w in self._workers.values()
            if (not model_ref or w.model_ref == model_ref)
            and (state == State.WORKER_STATE_UNSPECIFIED or w.state == state)
        ]

    def clear(self) -> list[WorkerRecord]:
        records = list(self._workers.values())
        self._workers.clear()
        self.changed.set()
        for record in records:
            self.feed.removed(record.id)
        return records

    def ports(self) -> Iterable[int]:
        return (w.port for w in self._workers.values())
