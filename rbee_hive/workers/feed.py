"""The local registry's changes as a stream (WatchWorkers): how the queen's
global registry stays current without polling (S6.2).

Every change gets the next sequence number and is kept in a bounded history,
so a watcher that reconnects to the same hive process gets only what it
missed; one that comes from another process (``instance`` differs) or is
further behind than the history reaches gets a snapshot instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from rbee.fanout import Subscription
from rbee.v1 import common_pb2, registry_pb2

HISTORY = 1024
# Changes one watcher may have unread before it is dropped (SLOW_FOLLOWER).
WATCHER_LIMIT = 4096
HEARTBEAT_S = 10.0


class ChangeFeed:
    def __init__(self, snapshot: Callable[[], list[common_pb2.WorkerInfo]], heartbeat_s: float = HEARTBEAT_S) -> None:
        self.instance = uuid.uuid4().hex
        self.seq = 0
        self._snapshot = snapshot
        self._heartbeat_s = heartbeat_s
        self._history: deque[registry_pb2.WatchWorkersResponse] = deque(maxlen=HISTORY)
        self._watchers: set[Subscription[registry_pb2.WatchWorkersResponse]] = set()

    def _publish(self, **fields) -> None:
        self.seq += 1
        msg = registry_pb2.WatchWorkersResponse(hive_instance=self.instance, seq=self.seq, **fields)
        self._history.append(msg)
        for queue in self._watchers:
            queue.offer(msg)

    def upsert(self, info: common_pb2.WorkerInfo) -> None:
        self._publish(workers=[info])

    def removed(self, worker_id: str) -> None:
        self._publish(removed_id=worker_id)

    def _catch_up(self, instance: str, after_seq: int) -> list[registry_pb2.WatchWorkersResponse]:
        oldest = self._history[0].seq if self._history else self.seq + 1
        if instance == self.instance and after_seq <= self.seq and (after_seq + 1 >= oldest or after_seq == self.seq):
            return [m for m in self._history if m.seq > after_seq]
        return [registry_pb2.WatchWorkersResponse(hive_instance=self.instance, seq=self.seq, snapshot=True,
                                                  workers=self._snapshot())]  # fmt: skip

    async def watch(self, instance: str, after_seq: int) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        # Bounded: a watcher that stops reading is dropped with SLOW_FOLLOWER
        # (a queen reconnects and resumes from its last sequence number).
        queue: Subscription[registry_pb2.WatchWorkersResponse] = Subscription(WATCHER_LIMIT, "worker watcher")
        # Subscribed before the catch-up is built: nothing falls in between.
        self._watchers.add(queue)
        try:
            last = 0
            for msg in self._catch_up(instance, after_seq):
                last = msg.seq
                yield msg
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), self._heartbeat_s)
                except asyncio.TimeoutError:
                    yield registry_pb2.WatchWorkersResponse(hive_instance=self.instance, seq=self.seq, heartbeat=True)
                    continue
                if msg.seq > last:
                    last = msg.seq
                    yield msg
        finally:
            self._watchers.discard(queue)
