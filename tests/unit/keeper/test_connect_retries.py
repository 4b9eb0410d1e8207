"""Connecting to a daemon (S9): 3 attempts, 200 then 400 ms apart (with
jitter), then CONNECTION_TIMEOUT naming the address and the attempts."""

from __future__ import annotations

import asyncio
import subprocess
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rbee.errors import CODES, RbeeError
from rbee_keeper.hive_client import HiveClient
from rbee_keeper.queen_client import QueenClient

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.ports import free_port

import pytest


async def serve_after(port: int, delay: float, started: asyncio.Event) -> grpc.aio.Server:
    await asyncio.sleep(delay)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    started.set()
    return server


def test_the_code_is_in_the_one_map():
    assert CODES["CONNECTION_TIMEOUT"] is grpc.StatusCode.UNAVAILABLE


async def test_a_daemon_that_starts_listening_after_300_ms_is_reached():
    port = free_port()
    started = asyncio.Event()
    retries: list[str] = []
    server_task = asyncio.create_task(serve_after(port, 0.3, started))
    t0 = time.monotonic()
    client = HiveClient(f"127.0.0.1:{port}", "k", "--api-key")
    client.on_retry = retries.append
    try:
        await client.ensure_connected()
        elapsed = time.monotonic() - t0
        reply = await health_pb2_grpc.HealthStub(client._channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await client.close()
        server = await server_task
        await server.stop(None)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Refused at 0 ms and after ~200 ms; the third attempt (~600 ms) connects.
    assert len(retries) == 2, retries
    assert "attempt 2 of 3 in" in retries[0] and "attempt 3 of 3 in" in retries[1]
    assert 0.45 <= elapsed < 3.0, elapsed


async def test_nothing_listening_is_connection_timeout_after_three_attempts():
    port = free_port()
    retries: list[str] = []
    client = QueenClient(f"127.0.0.1:{port}", "k", "--api-key")
    client.on_retry = retries.append
    t0 = time.monotonic()
    with pytest.raises(RbeeError) as caught:
        async with client:
            pass
    elapsed = time.monotonic() - t0
    err = caught.value
    assert err.code == "CONNECTION_TIMEOUT"
    assert f"Cannot reach the queen at 127.0.0.1:{port} after 3 attempts" in err.message
    assert err.details["address"] == f"127.0.0.1:{port}" and err.details["attempts"] == "3"
    assert any("queen-rbee daemon" in s for s in err.suggestions)
    # Two waits: 200 ms and 400 ms, each ±20 %.
    assert 0.45 <= elapsed < 3.0, elapsed
    assert len(retries) == 2


def test_the_keeper_program_narrates_its_retries_and_exits_1():
    port = free_port()
    env = proc_env(HOME="/nonexistent", NO_COLOR="1")
    env.pop("RBEE_CONFIG", None)
    proc = subprocess.run(
        [str(VENV_BIN / "rbee-keeper"), "models", "list", "--hive", f"127.0.0.1:{port}", "--api-key", "k"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"❌ CONNECTION_TIMEOUT: Cannot reach the hive at 127.0.0.1:{port} after 3 attempts" in proc.stderr
    assert proc.stderr.count("did not answer") == 2
    assert "attempts: 3" in proc.stderr and "rbee-hive daemon --port" in proc.stderr
