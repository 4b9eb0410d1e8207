"""Reaching a hive (docs/queen.md, "Reaching a hive"): the queen asks three
times, 200 ms then 400 ms apart, narrating each retry, before it decides no
hive answers; a port that answers garbage is a failed attempt, not a hang."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rbee_queen.hives import HiveLink
from rbee_queen.nodes.store import NodeRecord
from tests.fixtures.ports import free_port


def record(port: int) -> NodeRecord:
    return NodeRecord(name="box", transport="local", install_path="/srv/rbee", hive_key="k" * 32, hive_port=port)


async def serve_health(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_a_hive_that_answers_at_the_second_attempt_is_reached() -> None:
    port = free_port()
    lines: list[str] = []
    started: list[grpc.aio.Server] = []

    def narrate(emoji: str, message: str, *args) -> None:
        lines.append(message)
        if not started:
            started.append(asyncio.get_running_loop().create_task(serve_health(port)))

    async with HiveLink(record(port)) as link:
        try:
            assert await link.reachable(narrate, backoff=(0.5, 0.5))
        finally:
            server = await started[0]
            await server.stop(None)
    assert len(lines) == 1 and "attempt 1/3" in lines[0] and "trying again in 500 ms" in lines[0]


async def test_no_hive_is_three_narrated_attempts_then_cannot_connect() -> None:
    lines: list[str] = []
    async with HiveLink(record(free_port())) as link:
        assert not await link.reachable(lambda emoji, message, *a: lines.append(message))
    assert [l.split("(")[1].split(")")[0] for l in lines[:2]] == ["attempt 1/3", "attempt 2/3"]
    assert "in 200 ms" in lines[0] and "in 400 ms" in lines[1]
    assert lines[2].startswith("Cannot connect to rbee-hive at 127.0.0.1:") and "after 3 attempts" in lines[2]


async def test_a_port_that_answers_garbage_is_not_a_hive() -> None:
    served: list[int] = []

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(1)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nnot a hive\n" * 10)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lines: list[str] = []
    try:
        async with HiveLink(record(port)) as link:
            assert not await link.reachable(lambda emoji, message, *a: lines.append(message), backoff=(0.01, 0.01))
    finally:
        server.close()
    assert served and "after 3 attempts" in lines[-1]


def test_a_starting_daemon_is_tried_again_at_least_every_second() -> None:
    """gRPC's own reconnect backoff grows to 2 minutes: a hive the queen started
    that listens only after 45 s would not be asked again before 70 s."""
    from rbee.channel import CHANNEL_OPTIONS

    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.max_reconnect_backoff_ms"] <= 1_000
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]
