"""The queen's HTTP port under an attacker's bodies (rbee_queen/http/guard.py):
a real queen process under 16 concurrent unauthenticated 100 MB POSTs (before:
the web page's action routes read each body whole, the queen grew from ~100 MB
to a 4.8 GB peak), and the official `openai` client with a key sending a body
past the bound (a clean 413 in OpenAI's shape, not a broken connection)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from rbee_queen.http.guard import MAX_BODY_BYTES
from tests.fixtures.hive import free_port_block
from tests.integration.test_front_door_proxy import ADMIN, CHAT, MODEL, front_door
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import KEY, worker_harness

POSTS = 16
SIZE = 100 * 1024 * 1024
CHUNK = b"x" * (1 << 20)
pytestmark = pytest.mark.asyncio(loop_scope="session")


async def unauthenticated_post(port: int, path: str) -> tuple[bytes, int]:
    """(the status line, or b"" when the queen closed first; MB the client got to send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: queen\r\nContent-Type: application/json\r\nContent-Length: {SIZE}\r\n\r\n"
    writer.write(head.encode())
    sent = 0
    try:
        while sent < SIZE:
            writer.write(CHUNK)
            await asyncio.wait_for(writer.drain(), 60)
            sent += len(CHUNK)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
    except (ConnectionError, asyncio.TimeoutError):
        line = b""
    writer.close()
    return line, sent >> 20


@pytest.mark.parametrize("path", ["/api/web/workers/stop", "/v1/chat/completions"])
async def test_unauthenticated_bodies_are_not_read(queen_factory, path: str) -> None:
    http_port = free_port_block(1)
    queen = await queen_factory(RBEE_QUEEN_HTTP_PORT=str(http_port))
    proc = psutil.Process(queen.proc.pid)
    before = proc.memory_info().rss
    peak = before
    posts = [asyncio.ensure_future(unauthenticated_post(http_port, path)) for _ in range(POSTS)]
    while not all(p.done() for p in posts):
        peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.05)
    replies = [p.result() for p in posts]
    # Each is refused (401, or the connection closed before the client read it) ...
    assert all(line in (b"", b"HTTP/1.1 401 Unauthorized\r\n") for line, _ in replies), replies
    # ... and the queen neither kept nor drained the bodies: the clients could not send them.
    assert sum(mb for _, mb in replies) < POSTS * 100 // 4, replies
    assert peak - before < 200 * 1024 * 1024, (before >> 20, peak >> 20)


async def test_a_body_past_the_bound_is_a_413_the_openai_client_reads(tmp_path: Path) -> None:
    async with worker_harness(FakeEngine(), slots=1) as h, front_door(tmp_path, h.address, KEY, 1) as door:
        big = [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]
        with pytest.raises(openai.APIStatusError) as err:
            await door.client(ADMIN).chat.completions.create(model=MODEL, messages=big, max_tokens=2)
        assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
        # The connection served the next request.
        assert (await door.client(ADMIN).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)).choices


async def test_a_request_head_is_bounded_and_large_bodies_still_pass(tmp_path: Path) -> None:
    """uvicorn's httptools parser kept a request's headers without a bound (4 connections
    sending 20 MB of one header took a queen from 97 to 243 MB)."""
    from rbee_queen.http.guard import MAX_HEAD_BYTES

    async with worker_harness(FakeEngine(), slots=1) as h, front_door(tmp_path, h.address, KEY, 1) as door:
        port = door.server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: queen\r\nX-Big: ")
        sent = 0
        try:
            while sent < 32 * MAX_HEAD_BYTES:
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), 30)
                sent += 65536
        except ConnectionError:
            pass
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
        except ConnectionError:
            line = b""
        writer.close()
        assert line in (b"", b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), line
        # A body of several MiB with a key still reaches its route (here: not JSON, so 400).
        async with httpx.AsyncClient(timeout=60) as http:
            body = b"{" + b" " * (3 << 20)
            reply = await http.post(f"{door.base_url}/chat/completions", content=body, headers={"Authorization": f"Bearer {ADMIN}"})
            assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
            assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
