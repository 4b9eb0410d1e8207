"""The daemons' server options accept the clients' keepalive pings through a
quiet stream (gRPC's server defaults would end the connection with GOAWAY
"too_many_pings" after a couple of early pings).

The client reaches the server through a TCP relay that reads the client's
HTTP/2 frames and counts its PING frames, so the test knows pings were sent
(and how many) instead of trusting that some were."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import _async as health, health_pb2, health_pb2_grpc

from rbee.channel import CHANNEL_OPTIONS, SERVER_OPTIONS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PING, ACK = 0x6, 0x1
# With the server's defaults the third early ping is answered with GOAWAY;
# a quiet stream that outlives this many pings was not ended for them.
PINGS = 4


class PingCounter:
    """A relay from a local port to ``target``, counting the client's PING frames (not ACKs)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pings = 0
        self.enough = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        for coro in (self._client_to_server(client_r, server_w), self._copy(server_r, client_w)):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        preface = await reader.readexactly(len(PREFACE))
        assert preface == PREFACE
        writer.write(preface)
        while True:
            header = await reader.readexactly(9)
            length = int.from_bytes(header[:3], "big")
            payload = await reader.readexactly(length)
            if header[3] == PING and not header[4] & ACK:
                self.pings += 1
                if self.pings >= PINGS:
                    self.enough.set()
            writer.write(header + payload)
            await writer.drain()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def test_a_quiet_stream_survives_frequent_client_pings():
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = health.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    relay = PingCounter(port)
    relay_port = await relay.start()
    # The clients' options with pings every 2 s instead of every 10 s, and
    # no BDP probes (pings of their own), so every PING counted is a keepalive.
    options = [(k, v) for k, v in CHANNEL_OPTIONS if k != "grpc.keepalive_time_ms"]
    options += [("grpc.keepalive_time_ms", 2_000), ("grpc.http2.bdp_probe", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}", options=options) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing flows now; only pings cross the connection.
            reader = asyncio.ensure_future(watch.read())
            pinged = asyncio.ensure_future(relay.enough.wait())
            done, _ = await asyncio.wait({reader, pinged}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            assert pinged in done, f"{relay.pings} pings seen; the quiet stream ended: {reader.exception() or reader.result() if reader.done() else 'no'}"
            assert not reader.done(), f"the quiet stream ended after {relay.pings} pings"
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            changed = await asyncio.wait_for(reader, 10)
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await relay.close()
        await server.stop(None)
