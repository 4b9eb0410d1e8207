"""grpc's own size limit, seen from both ends: a message past a server's
receive limit (or a client's) is MESSAGE_TOO_LARGE naming the limit, never
ALL_SLOTS_BUSY (which the keeper retries and answers with advice on --slots)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from rbee.errors import from_rpc_error

LIMIT = 64 * 1024


@asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request * 4

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT)])
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Call": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _refusal(address: str, payload: bytes, options=()) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Echo/Call")(payload)
    return info.value


async def test_a_request_past_the_servers_limit_is_message_too_large():
    async with echo_server() as address:
        raw = await _refusal(address, b"x" * (LIMIT + 1))
    assert raw.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    err = from_rpc_error(raw, target=address)
    assert err.code == "MESSAGE_TOO_LARGE"
    assert err.details["limit_bytes"] == str(LIMIT) and int(err.details["size_bytes"]) > LIMIT
    assert f"{address} accepts at most {LIMIT} bytes" in err.message
    assert "slots" not in " ".join([err.message, *err.suggestions])


async def test_a_reply_past_the_clients_limit_is_message_too_large():
    async with echo_server() as address:
        raw = await _refusal(address, b"y" * 1000, options=[("grpc.max_receive_message_length", 2000)])
    err = from_rpc_error(raw)
    assert err.code == "MESSAGE_TOO_LARGE" and err.details["limit_bytes"] == "2000"
    assert "reply of 4" in err.message


async def test_a_request_past_the_clients_send_limit_is_message_too_large():
    async with echo_server() as address:
        raw = await _refusal(address, b"z" * 3000, options=[("grpc.max_send_message_length", 2000)])
    err = from_rpc_error(raw)
    assert err.code == "MESSAGE_TOO_LARGE" and err.details["limit_bytes"] == "2000"
