"""Telling the hive about this worker (the ready callback and state changes).

Best effort and off the token path: notify() only flags that the state
changed; one background task sends the latest snapshot. Intermediate states
that pass while a report is on the wire are folded into the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from rbee.channel import metadata, open_channel
from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import Narrator
from rbee.retry import backoff_delays
from rbee.tls import TlsIdentity
from rbee.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 5.0
ATTEMPTS = 3
# While busy, the snapshot (with the worker's load) is re-sent this often.
BUSY_REPORT_INTERVAL_S = 5.0


class HiveReporter:
    def __init__(
        self,
        address: str,
        api_key: str,
        snapshot: Callable[[], tuple[common_pb2.WorkerInfo, RbeeError | None]],
        narrator: Narrator,
        busy: Callable[[], bool] = lambda: False,
        busy_interval_s: float = BUSY_REPORT_INTERVAL_S,
        tls: "TlsIdentity | None" = None,
    ) -> None:
        self._tls = tls
        self._busy = busy
        self._busy_interval_s = busy_interval_s
        self._ticker: asyncio.Task | None = None
        self.address = address
        self._key = api_key
        self._snapshot = snapshot
        self._narrate = narrator
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()
        self._complained = False
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self.reports_sent = 0

    def start(self) -> None:
        self._channel = open_channel(self.address, self._tls)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="hive-reporter")
        self._ticker = loop.create_task(self._tick(), name="hive-reporter-load")

    def notify(self) -> None:
        self._sent.clear()
        self._wake.set()

    async def flush(self, timeout_s: float = REPORT_TIMEOUT_S * 2) -> bool:
        """Wait (bounded) until the latest state has been reported or given up on."""
        try:
            await asyncio.wait_for(self._sent.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._busy_interval_s)
            if self._busy():
                self.notify()

    async def close(self) -> None:
        for task in (self._ticker, self._task):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        assert self._channel is not None
        stub = registry_pb2_grpc.WorkerCallbackServiceStub(self._channel)
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._report(stub)
            if not self._wake.is_set():
                self._sent.set()

    async def _report(self, stub: registry_pb2_grpc.WorkerCallbackServiceStub) -> None:
        delays = backoff_delays(500, ATTEMPTS)
        while True:
            info, error = self._snapshot()
            request = registry_pb2.ReportWorkerRequest(worker=info)
            if error is not None:
                request.error_status = error.to_status_proto().SerializeToString()
            try:
                await stub.ReportWorker(request, metadata=metadata(self._key), timeout=REPORT_TIMEOUT_S)
                self.reports_sent += 1
                return
            except grpc.RpcError as exc:
                err = from_rpc_error(exc, self.address)
            delay = next(delays, None)
            # A newer state supersedes this one: report that instead of retrying.
            if delay is None or self._wake.is_set():
                if not self._complained:
                    self._complained = True
                    self._narrate(
                        "⚠️",
                        f"Could not report to the hive at {self.address}: {err.code}: {err.message} "
                        "(continuing; further failures are not narrated)",
                        level="warn",
                    )
                return
            await asyncio.sleep(delay)
