"""A follower of a real hive's logs that stops reading while a worker writes
300,000 lines: the hive drops it with SLOW_FOLLOWER instead of queueing every
line for it (before, the queue held them all), and its memory stays bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import psutil
import pytest

from rbee.errors import from_rpc_error
from rbee.v1 import registry_pb2
from rbee_hive.logbook import FOLLOWER_LIMIT

pytestmark = pytest.mark.asyncio(loop_scope="session")

LINES = 300_000


def chatty_program(folder: Path, worker: Path) -> Path:
    """The stand-in worker, after printing LINES lines (its log gets them)."""
    program = folder / "llm-worker-rbee"
    folder.mkdir(parents=True, exist_ok=True)
    program.write_text(f"#!/bin/sh\nseq 1 {LINES} | sed 's/^/chatter line /'\nexec {worker} \"$@\"\n")
    program.chmod(0o755)
    return program


async def test_a_stalled_log_follower_is_dropped(start_hive, standin_program: Path, model: Path, tmp_path: Path) -> None:
    hive = await start_hive(worker_binary=chatty_program(tmp_path / "bin", standin_program))
    call = hive.workers.StreamLogs(registry_pb2.StreamLogsRequest(follow=True), metadata=hive.md, timeout=300)
    first = await call.read()  # subscribed (the history's first line); then it reads nothing more
    assert first.line
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    log = Path(reply.log_path)
    while "chatter line 300000" not in (log.read_text(errors="replace") if log.exists() else ""):
        await asyncio.sleep(0.2)
    rss_mb = psutil.Process(hive.proc.pid).memory_info().rss / 1e6

    received = 0
    with pytest.raises(grpc.RpcError) as caught:
        while (item := await call.read()) is not grpc.aio.EOF:
            received += 1
    err = from_rpc_error(caught.value)
    assert err.code == "SLOW_FOLLOWER" and str(FOLLOWER_LIMIT) in err.message, err
    assert received < LINES
    print(f"hive RSS once the worker wrote {LINES} lines: {rss_mb:.0f} MB; the follower got {received} lines, then SLOW_FOLLOWER")
