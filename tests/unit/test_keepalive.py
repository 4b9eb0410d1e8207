"""The daemons' server options accept the clients' keepalive pings through a
quiet stream (gRPC's server defaults would end the connection with GOAWAY
"too_many_pings" after a couple of early pings)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import _async as health, health_pb2, health_pb2_grpc

from rbee.channel import CHANNEL_OPTIONS, SERVER_OPTIONS

QUIET_S = 8.0


async def test_a_quiet_stream_survives_frequent_client_pings():
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = health.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The clients' options with pings every 2 s instead of every 10 s.
    options = [(k, v) for k, v in CHANNEL_OPTIONS if k != "grpc.keepalive_time_ms"]
    options.append(("grpc.keepalive_time_ms", 2_000))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing flows for a while; only pings cross the connection.
            reader = asyncio.ensure_future(watch.read())
            done, _ = await asyncio.wait({reader}, timeout=QUIET_S)
            assert not done, f"the quiet stream ended: {reader.result() if not reader.exception() else reader.exception()}"
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            changed = await asyncio.wait_for(reader, 10)
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await server.stop(None)
