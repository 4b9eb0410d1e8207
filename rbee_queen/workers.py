"""The queen's global worker registry (S6.2): every worker on every node, in
memory, fed by each hive's change stream (WatchWorkers) rather than polling.

Each node's hive is followed by one watcher task. The stream opens with a
snapshot (or, on reconnecting to the same hive instance, only the changes
after the last sequence number seen), then carries each change and a
heartbeat. A node whose hive has not been heard from for ``stale_after``
(120 s by default) loses its workers from the registry. A queen that
restarts rebuilds the registry by following every registered node's hive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from rbee.backends import backend_name
from rbee.narration import Narrator
from rbee.v1 import common_pb2, registry_pb2, tasks_pb2

from rbee_queen.hives import HiveLink
from rbee_queen.nodes.store import NodeRecord, NodeStore

log = logging.getLogger(__name__)

State = common_pb2.WorkerState

# What one hive may put in this registry (a hostile or broken hive must not
# grow the queen without end): workers per node (a hive's worker port range
# is 90 ports by default), the size of one worker's entry and of its id.
# What passes them is left out, and said once per node in the queen's log.
MAX_WORKERS_PER_HIVE = 512
MAX_WORKER_INFO_BYTES = 16 * 1024
MAX_WORKER_ID = 128


def _admissible(info: common_pb2.WorkerInfo) -> bool:
    # A worker on a backend this queen does not know (a newer hive's) is not listed.
    known = info.backend in common_pb2.Backend.values()
    return 0 < len(info.id) <= MAX_WORKER_ID and info.ByteSize() <= MAX_WORKER_INFO_BYTES and known


def capability(info: common_pb2.WorkerInfo) -> str:
    """``cpu`` for the CPU backend, ``BACKEND:DEVICE`` otherwise (``cuda:1``)."""
    backend = backend_name(info.backend)
    return backend if backend in ("cpu", "") else f"{backend}:{info.device}"


def reachable_address(record: NodeRecord, address: str) -> str:
    """A worker's address as the keeper reaches it: a worker of a remote node
    that reports a loopback or wildcard host is reached at the node's host."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if record.hive_host.startswith("127.") or record.hive_host == "::1":
        return address
    if host in ("0.0.0.0", "::", "") or host.startswith("127.") or host == "::1":
        node_host = record.hive_host
        return f"[{node_host}]:{port}" if ":" in node_host else f"{node_host}:{port}"
    return address


@dataclass
class NodeWorkers:
    hive_address: str
    workers: dict[str, common_pb2.WorkerInfo] = field(default_factory=dict)
    last_heard: float = 0.0
    last_heard_unix_ms: int = 0
    # The resume point: which hive process, and the last change applied.
    instance: str = ""
    seq: int = 0
    # The change stream is open (False from its failure until the next message).
    streaming: bool = False
    # Worker entries left out for passing a cap (MAX_WORKERS_PER_HIVE, ...).
    refused: int = 0


class ClusterWorkers:
    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._nodes: dict[str, NodeWorkers] = {}
        self.changed = asyncio.Event()
        # One event per watcher of changes (the web page's streams, docs/web.md).
        self._listeners: set[asyncio.Event] = set()
        # When this queen first heard of each worker (unix ms): its age on the web page.
        self.first_seen: dict[str, int] = {}
        # Called with (node, worker) for every worker entry applied, in order
        # (the keep-alive sees each busy moment, however short).
        self.observers: list = []

    def _notify(self) -> None:
        self.changed.set()
        for listener in list(self._listeners):
            listener.set()

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Event]:
        """An event set on every change from now on; the listener clears it."""
        listener = asyncio.Event()
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    def resume_point(self, node: str) -> tuple[str, int]:
        entry = self._nodes.get(node)
        return (entry.instance, entry.seq) if entry else ("", 0)

    def apply(self, node: str, hive_address: str, msg: registry_pb2.WatchWorkersResponse) -> bool:
        """Apply one message; False when it cannot be applied to what is known
        (another hive instance, or the node was swept meanwhile): the caller
        reconnects for a snapshot."""
        entry = self._nodes.setdefault(node, NodeWorkers(hive_address))
        entry.hive_address = hive_address
        entry.last_heard = time.monotonic()
        entry.last_heard_unix_ms = int(time.time() * 1000)
        entry.streaming = True
        if msg.hive_instance != entry.instance and not msg.snapshot:
            entry.workers.clear()  # another hive process, or swept: what we knew is void
            entry.instance, entry.seq = "", 0
            self._notify()
            return False
        entry.instance = msg.hive_instance
        refused = entry.refused
        if msg.snapshot:
            entry.workers = {}
        for w in msg.workers:
            if not _admissible(w) or (w.id not in entry.workers and len(entry.workers) >= MAX_WORKERS_PER_HIVE):
                entry.refused += 1
                continue
            entry.workers[w.id] = w
            for observe in self.observers:
                observe(node, w)
        if msg.removed_id:
            entry.workers.pop(msg.removed_id, None)
        if refused == 0 and entry.refused:
            log.warning("the hive of %s reports workers beyond the queen's caps (%d per node, %d bytes and a %d-character "
                        "id each): those are left out of the registry", node, MAX_WORKERS_PER_HIVE, MAX_WORKER_INFO_BYTES,
                        MAX_WORKER_ID)  # fmt: skip
        entry.seq = max(entry.seq, msg.seq) if not msg.snapshot else msg.seq
        now_ms = int(time.time() * 1000)
        for w in msg.workers:
            self.first_seen.setdefault(w.id, now_ms)
        live = {w for e in self._nodes.values() for w in e.workers}
        for gone in set(self.first_seen) - live:
            del self.first_seen[gone]
        self._notify()
        return True

    def stream_lost(self, node: str) -> None:
        entry = self._nodes.get(node)
        if entry is not None:
            entry.streaming = False

    def heard_from(self, node: str, now: float | None = None) -> bool:
        """Whether the node's hive is followed now: its change stream open and
        heard from (a change or a heartbeat) within stale_after."""
        entry = self._nodes.get(node)
        if entry is None or not entry.instance or not entry.streaming:
            return False
        now = time.monotonic() if now is None else now
        return now - entry.last_heard <= self.stale_after_s

    def forget(self, node: str) -> None:
        self._nodes.pop(node, None)
        self._notify()

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop the workers of nodes not heard from within stale_after; their names."""
        now = time.monotonic() if now is None else now
        dropped = []
        for name, entry in self._nodes.items():
            if entry.workers and now - entry.last_heard > self.stale_after_s:
                entry.workers.clear()
                entry.instance, entry.seq = "", 0
                dropped.append(name)
        if dropped:
            self._notify()
        return dropped

    def worker(self, node: str, worker_id: str) -> common_pb2.WorkerInfo | None:
        """One worker of ``node`` as last reported, or None."""
        entry = self._nodes.get(node)
        return entry.workers.get(worker_id) if entry is not None else None

    def list(self, node: str = "", model_ref: str = "", cap: str = "", state: int = 0) -> list[tasks_pb2.ClusterWorker]:
        out = []
        for name in sorted(self._nodes):
            if node and name != node:
                continue
            entry = self._nodes[name]
            for w in sorted(entry.workers.values(), key=lambda w: w.id):
                c = capability(w)
                if model_ref and w.model_ref != model_ref:
                    continue
                if cap and c != cap and c.split(":")[0] != cap:
                    continue
                if state and w.state != state:
                    continue
                out.append(tasks_pb2.ClusterWorker(node=name, hive_address=entry.hive_address, worker=w, capability=c,
                                                   last_heard_unix_ms=entry.last_heard_unix_ms))  # fmt: skip
        return out


class HiveWatchers:
    """One task per node following its hive's WatchWorkers stream, reconnecting
    with a capped backoff; plus the sweeper of stale nodes."""

    def __init__(self, store: NodeStore, registry: ClusterWorkers, log: Narrator, retry_max_s: float = 10.0) -> None:
        self.store = store
        self.registry = registry
        self.narrate = log
        self.retry_max_s = retry_max_s
        self._tasks: dict[str, asyncio.Task] = {}
        # Set to cut a watcher's wait before its next attempt short.
        self._wake: dict[str, asyncio.Event] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        for record in self.store.list():
            self.ensure(record.name)
        self._sweeper = asyncio.ensure_future(self._sweep())

    def ensure(self, name: str) -> None:
        """Follow node ``name``'s hive; one already followed but waiting to
        reconnect (its hive was down) tries again now: the caller has just
        made the hive ready, and the registry should not lag its backoff."""
        task = self._tasks.get(name)
        if task is None or task.done():
            self._wake[name] = asyncio.Event()
            self._tasks[name] = asyncio.ensure_future(self._watch(name))
        else:
            self._wake[name].set()

    async def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self._wake.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.registry.forget(name)

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper

    async def _sweep(self) -> None:
        interval = max(0.2, min(10.0, self.registry.stale_after_s / 4))
        while True:
            await asyncio.sleep(interval)
            for name in self.registry.sweep():
                self.narrate("🧹", f"No word from the hive of {name} for {self.registry.stale_after_s:g}s: its workers are dropped from the registry", "warn")

    async def _watch(self, name: str) -> None:
        delay = 0.5
        was_connected = False
        while True:
            try:
                record = self.store.get(name)
            except Exception:  # noqa: BLE001 - removed meanwhile
                return
            link = HiveLink(record)
            try:
                instance, seq = self.registry.resume_point(name)
                call = link.workers.WatchWorkers(registry_pb2.WatchWorkersRequest(hive_instance=instance, after_seq=seq),
                                                 metadata=link.md)  # fmt: skip
                async for msg in call:
                    if not was_connected:
                        was_connected = True
                        log.info("following the workers of %s at %s", name, record.hive_address)
                    delay = 0.5
                    if not self.registry.apply(name, record.hive_address, msg):
                        break  # reconnect: the resume point is void, a snapshot follows
            except grpc.RpcError as err:
                if was_connected:
                    log.info("lost the worker stream of %s: %s", name, err.code())
                was_connected = False
                self.registry.stream_lost(name)
            finally:
                await link.close()
            wake = self._wake[name]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            wake.clear()
            delay = min(self.retry_max_s, delay * 2)
