"""Waiting for a worker to be ready (S1 step 10, S7): follow its loading
progress, give up after the loading budget with where to look, refuse workers
that failed or are shutting down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from rbee.backends import backend_name
from rbee.config import logs_dir
from rbee.errors import RbeeError
from rbee.narration import Narrator, stage_of
from rbee.v1 import common_pb2, inference_pb2

from rbee_keeper.render import LoadingView
from rbee_keeper.worker_client import WorkerClient

WS = common_pb2.WorkerState
SERVING = (WS.WORKER_STATE_IDLE, WS.WORKER_STATE_BUSY)


class ReadinessWaiter:
    def __init__(
        self,
        client: WorkerClient,
        narrate: Narrator,
        connect_s: float,
        wait_for_server: bool,
        loading_s: float,
        loading_view: Callable[[], LoadingView],
    ) -> None:
        self.client = client
        self.narrate = narrate
        self.connect_s = connect_s
        self.wait_for_server = wait_for_server
        self.loading_s = loading_s
        self._loading_view = loading_view
        self._last_stage = ""

    @property
    def worker(self) -> str:
        return self.client.address

    async def wait(self) -> inference_pb2.GetReadinessResponse:
        ready = await self.client.readiness(self.connect_s, wait_for_ready=self.wait_for_server)
        if ready.state in SERVING:
            return ready
        self._refuse_state(ready)
        self.narrate(
            "⏳", f"Worker {self.worker} is loading {ready.model_ref or 'its model'}; waiting up to {self.loading_s:g}s"
        )
        view = self._loading_view()
        if ready.HasField("progress"):
            self._last_stage = stage_of(ready.progress)
            view.update(ready.progress)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.loading_s):
                ready = await self._follow(view)
        except TimeoutError:
            raise self._loading_timeout(ready) from None
        finally:
            view.close()
        self.narrate("✅", f"Model loaded on {self.worker} after {time.monotonic() - started:.1f}s of waiting")
        return ready

    async def _follow(self, view: LoadingView) -> inference_pb2.GetReadinessResponse:
        while True:
            call = self.client.loading_progress()
            try:
                async for msg in call:
                    view.show(msg)
                    if msg.HasField("progress"):
                        self._last_stage = stage_of(msg.progress)
                    if msg.state == WS.WORKER_STATE_FAILED:
                        raise self._load_failed(msg.progress.message if msg.HasField("progress") else "")
                    if msg.state in SERVING:
                        break
            except grpc.RpcError as err:
                raise self.client.error(err) from None
            finally:
                call.cancel()
            ready = await self.client.readiness(self.connect_s)
            if ready.state in SERVING:
                return ready
            self._refuse_state(ready)
            # The stream ended while the worker still loads (e.g. it restarted
            # the stream); follow it again without spinning.
            await asyncio.sleep(0.5)

    def _refuse_state(self, ready: inference_pb2.GetReadinessResponse) -> None:
        if ready.state == WS.WORKER_STATE_FAILED:
            raise self._load_failed(ready.progress.message if ready.HasField("progress") else "")
        if ready.state in (WS.WORKER_STATE_DRAINING, WS.WORKER_STATE_STOPPED):
            raise RbeeError(
                "WORKER_DRAINING",
                f"Worker {self.worker} is shutting down and takes no new requests",
                {"worker": self.worker, "state": WS.Name(ready.state)},
                ["Start another worker for this model and send the request there"],
            )

    def _load_failed(self, why: str) -> RbeeError:
        return RbeeError(
            "MODEL_LOAD_FAILED",
            f"Worker {self.worker} failed to load its model" + (f": {why}" if why else ""),
            {"worker": self.worker},
            [f"Look at the worker's log (workers started by rbee-hive log under {logs_dir()})"],
        )

    def _loading_timeout(self, ready: inference_pb2.GetReadinessResponse) -> RbeeError:
        return RbeeError(
            "LOADING_TIMEOUT",
            f"Worker {self.worker} did not finish loading {ready.model_ref or 'its model'} within {self.loading_s:g}s",
            {"worker": self.worker, "waited_s": f"{self.loading_s:g}", "last_stage": self._last_stage or "unknown"},
            [
                f"Look at the worker's log: workers started by rbee-hive write theirs under {logs_dir()}; "
                "a worker started by hand logs to its own output",
                "Check memory and CPU load on the worker's machine: a model that does not fit loads slowly or never",
                "Run the command again once the worker reports it is loaded",
            ],
        )


def check_expected(
    ready: inference_pb2.GetReadinessResponse, worker: str, backend: str | None, device: int | None
) -> None:
    """With --worker, --backend/--device describe the worker the user expects."""
    running = backend_name(ready.backend)
    if backend is not None and running and running != backend:
        raise RbeeError(
            "INVALID_BACKEND",
            f"Worker {worker} runs on {running}, not {backend}",
            {"worker": worker, "worker_backend": running, "requested": backend},
            ["Leave out --backend, or pick a worker started with that backend"],
        )
    if device is not None and ready.device != device:
        raise RbeeError(
            "INVALID_DEVICE",
            f"Worker {worker} runs on device {ready.device}, not {device}",
            {"worker": worker, "worker_device": ready.device, "requested": device},
            ["Leave out --device, or pick a worker started on that device"],
        )
