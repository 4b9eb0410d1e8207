"""`rbee-keeper infer --node NAME --model REF`: the queen prepares a worker
(S1 steps 2-9), the keeper then streams from that worker directly (step 10).

When every slot of the model is busy the queen queues the task (docs/queen.md,
"Admission queue"), so the keeper does not retry the queen's ALL_SLOTS_BUSY: it
means the queue was full or the wait over. Only a worker taken by another
client between the assignment and the request (its own ALL_SLOTS_BUSY) sends
the keeper back to the queen, which queues it again.

When no queen answers at the configured address (a loopback one), the keeper
starts one for this command (ephemeral mode, S8) and stops it afterwards; that
queen stops the hives it started, which stop their workers. A persistent queen
(started by an operator) is never stopped by the keeper.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.config import logs_dir
from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.tls_identity import QUEEN_NAME
from rbee.v1 import tasks_pb2

from rbee_keeper.daemon_client import keeper_tls, open_channel
from rbee_keeper.queen_client import QueenClient, resolve_queen_key

PROBE_TIMEOUT_S = 1.0
EPHEMERAL_START_TIMEOUT_S = 60.0
EPHEMERAL_STOP_TIMEOUT_S = 120.0
# How often a worker taken meanwhile sends the keeper back to the queen.
WORKER_TAKEN_ATTEMPTS = 3


async def queen_answers(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        tls = keeper_tls(address)
        # Over TLS the queen proves its identity name (rbee/tls_identity.py).
        channel = open_channel(address, tls.for_peer(QUEEN_NAME) if tls else None)
    except RbeeError:
        return False
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        await channel.close(grace=None)


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class EphemeralQueen:
    """A queen started for one command: its own process group, its output in
    $RBEE_HOME/logs/queen-ephemeral.log, stopped with SIGTERM (the cascade)."""

    def __init__(self, proc: subprocess.Popen, address: str, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.log = log

    @classmethod
    async def start(cls, address: str, narrate: Narrator) -> "EphemeralQueen":
        host, _, port = address.rpartition(":")
        program = Path(sys.executable).with_name("queen-rbee")
        log = logs_dir() / "queen-ephemeral.log"
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        narrate("👑", f"No queen answers at {address}: starting one for this command (ephemeral; log {log})")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                # One command's queen serves no HTTP (a long-lived queen may hold the port).
                [str(program), "daemon", "--host", host.strip("[]"), "--port", port, "--http-port", "0"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        queen = cls(proc, address, log)
        deadline = time.monotonic() + EPHEMERAL_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RbeeError("UNAVAILABLE", f"The queen started for this command exited with {proc.returncode}",
                                {"queen": address, "log": str(log)}, [f"Read {log}"])  # fmt: skip
            if await queen_answers(address, timeout=1.0):
                return queen
            await asyncio.sleep(0.1)
        await queen.stop(narrate)
        raise RbeeError("UNAVAILABLE", f"The queen started for this command did not answer within {EPHEMERAL_START_TIMEOUT_S:g}s",
                        {"queen": address, "log": str(log)}, [f"Read {log}"])  # fmt: skip

    async def stop(self, narrate: Narrator) -> None:
        if self.proc.poll() is None:
            narrate("🛑", f"Stopping the queen started for this command (it stops the hives it started)")
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), EPHEMERAL_STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                narrate("⚠️", f"The queen did not stop within {EPHEMERAL_STOP_TIMEOUT_S:g}s: killing it", "warn")
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await asyncio.to_thread(self.proc.wait)


class TaskView:
    """The task's events on stderr: narration as lines, downloads as a progress bar."""

    def __init__(self, model: str, narrate: Narrator) -> None:
        from rbee_keeper.commands.models import DownloadView

        self.narrate = narrate
        self._downloads = DownloadView(model)

    def show(self, event) -> None:
        if event.HasField("narration"):
            self._downloads.narration(event.narration)
        elif event.HasField("progress"):
            self._downloads.progress(event.progress)

    def close(self) -> None:
        self._downloads.close()


async def submit_task(client: QueenClient, request: tasks_pb2.SubmitInferenceRequest, narrate: Narrator) -> tasks_pb2.WorkerAssignment:
    """SubmitInference, its events shown (a wait in the queen's queue among them)."""
    view = TaskView(request.model_ref, narrate)
    try:
        async for item in client.submit(request):
            if item.HasField("event"):
                view.show(item.event)
            elif item.HasField("assigned"):
                return item.assigned
    finally:
        view.close()
    raise RbeeError("STREAM_BROKEN", "The queen ended the task without assigning a worker", {"queen": client.address})


async def run_with_queen(queen: str, api_key: str | None, request: tasks_pb2.SubmitInferenceRequest, narrate: Narrator,
                         use_worker) -> int:  # fmt: skip
    """Get a worker from the queen (starting an ephemeral queen if none answers),
    then ``use_worker(assignment)`` (the direct inference); the ephemeral queen
    is stopped afterwards whatever happened."""
    from rbee_keeper.validation import validate_queen_address

    address = validate_queen_address(queen)
    ephemeral: EphemeralQueen | None = None
    if not await queen_answers(address):
        if not _loopback(address):
            raise RbeeError("UNAVAILABLE", f"Cannot reach the queen at {address}", {"queen": address},
                            ["Start it there with `queen-rbee daemon`, or leave out --queen to use one on this machine"])  # fmt: skip
        ephemeral = await EphemeralQueen.start(address, narrate)
    try:
        key, source = resolve_queen_key(api_key, address)
        for attempt in range(1, WORKER_TAKEN_ATTEMPTS + 1):
            async with QueenClient(address, key, source) as client:
                assignment = await submit_task(client, request, narrate)
            w = assignment.worker
            narrate("🎯", f"{'Warm' if assignment.warm else 'Cold'} start: worker {w.id} at {w.address} on {assignment.node} "
                    f"(queen: {assignment.queen_ms} ms)")  # fmt: skip
            try:
                return await use_worker(assignment)
            except RbeeError as err:
                # The worker's own refusal comes before any token: nothing was printed.
                if err.code != "ALL_SLOTS_BUSY" or attempt == WORKER_TAKEN_ATTEMPTS:
                    raise
                narrate("🔁", f"Worker {w.id} was taken by another client meanwhile: asking the queen again "
                        f"({attempt}/{WORKER_TAKEN_ATTEMPTS - 1})")  # fmt: skip
        raise AssertionError("unreachable")
    finally:
        if ephemeral is not None:
            await ephemeral.stop(narrate)
