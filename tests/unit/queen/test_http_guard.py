"""The queen's HTTP port read as an attacker would (rbee_queen/http/guard.py,
web.py): on the real app, called as uvicorn calls it, with a ``receive`` that
counts what the app pulls of the body.

- A body without a valid key is never read: FastAPI used to read and parse the
  web page's JSON bodies before their key dependency ran (an unauthenticated
  500 MB POST to /api/web/workers/stop was read whole).
- Bodies are bounded with a 413 in OpenAI's shape, by Content-Length before a
  byte is read, and chunked ones at the bound.
- The page's event and log streams are capped per key and in all, counted
  from the moment they are admitted (requests arriving together used to pass
  the check together), and their slots come back.
- Logs need the admin key; every response carries the browser headers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from rbee_queen.activity import Activity
from rbee_queen.http import web
from rbee_queen.http.asgi import create_app
from rbee_queen.http.auth import Authenticator
from rbee_queen.http.guard import MAX_BODY_BYTES, MAX_PAGE_BODY_BYTES
from rbee_queen.nodes.store import NodeStore
from rbee_queen.workers import ClusterWorkers

ADMIN = "admin-key-for-tests"
APP = "inference-key-for-tests"
APP2 = "another-inference-key"
OTHERS = ["third-inference-key", "fourth-inference-key"]


@pytest.fixture
def queen(tmp_path: Path):
    store = NodeStore(tmp_path / "beehives.db")
    q = SimpleNamespace(
        store=store, nodes=SimpleNamespace(started_hives={}), registry=ClusterWorkers(120.0),
        tasks=SimpleNamespace(activity=Activity()), narrate=lambda *a, **k: None,
    )  # fmt: skip
    yield q
    store.close()


@pytest.fixture
def app(queen):
    keys = {APP: "inference", APP2: "inference", **{k: "inference" for k in OTHERS}}
    return create_app(Authenticator(ADMIN, keys.get), SimpleNamespace(), queen)


async def call(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict, bytes, int]:
    """One request as uvicorn hands it over: (status, headers, body, bytes of the request body the app pulled)."""
    pulled = 0
    pending = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if not pending:
            await asyncio.sleep(3600)  # a client still connected, sending nothing more
        chunk = pending.pop(0)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, pulled


BIG = 100 * 1024 * 1024
ROUTES = ("/api/web/workers/stop", "/api/web/models/download", "/v1/chat/completions", "/v1/completions", "/metrics", "/nowhere")


@pytest.mark.parametrize("path", ROUTES)
async def test_a_body_without_a_valid_key_is_not_read(app, path: str) -> None:
    chunk = b"x" * (1 << 20)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + ADMIN}):
        announced = {**headers, "Content-Length": str(BIG), "Content-Type": "application/json"}
        status, reply, body, pulled = await call(app, "POST", path, announced, [chunk] * 4)
        assert (status, pulled) == (401, 0), (path, headers)
        assert reply["connection"] == "close"  # uvicorn closes it rather than drain the body
        small = {**headers, "Content-Length": "20"}
        status, reply, _, pulled = await call(app, "POST", path, small, [b'{"model": "m"}' + b" " * 6])
        assert (status, pulled, "connection" in reply) == (401, 0, False)  # kept: its client reads the 401
        assert b'"type":"authentication_error"' in body and ADMIN.encode() not in body
        chunked = {**headers, "Transfer-Encoding": "chunked"}
        status, _, _, pulled = await call(app, "POST", path, chunked, [chunk] * 4)
        assert (status, pulled) == (401, 0), (path, headers)


async def test_bodies_are_bounded_with_a_413_in_openais_shape(app) -> None:
    key = {"Authorization": f"Bearer {APP}", "Content-Type": "application/json"}
    status, _, body, pulled = await call(app, "POST", "/v1/chat/completions", {**key, "Content-Length": str(MAX_BODY_BYTES + 1)}, [b"{"])
    assert (status, pulled) == (413, 0)
    assert b'"code":"request_too_large"' in body and b'"type":"invalid_request_error"' in body
    admin = {**key, "Authorization": f"Bearer {ADMIN}"}
    page = {**admin, "Content-Length": str(MAX_PAGE_BODY_BYTES + 1)}
    status, _, body, pulled = await call(app, "POST", "/api/web/workers/stop", page, [b"{"])
    assert (status, pulled) == (413, 0)
    # Chunked: cut at the bound, not read to its end.
    chunk = b" " * 65536
    status, reply, body, pulled = await call(app, "POST", "/api/web/models/download", {**admin, "Transfer-Encoding": "chunked"}, [chunk] * 100)
    assert status == 413 and pulled <= MAX_PAGE_BODY_BYTES + len(chunk)
    assert b'"code":"request_too_large"' in body and reply["connection"] == "close"
    status, _, body, pulled = await call(app, "POST", "/v1/completions", {**key, "Transfer-Encoding": "chunked"}, [b" " * (1 << 20)] * 20)
    assert status == 413 and pulled <= MAX_BODY_BYTES + (1 << 20)
    # Within the bound a body reaches its route as before.
    ok = b'{"node": "nowhere", "worker_id": "w-1"}'
    status, _, body, _ = await call(app, "POST", "/api/web/workers/stop", {**admin, "Content-Length": str(len(ok))}, [ok])
    assert status == 404 and b"NODE_NOT_FOUND" in body


async def test_every_response_carries_the_browser_headers(app) -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queen")
    for path in ("/health", "/api/web/me", "/nowhere", "/"):
        reply = await client.get(path)
        assert reply.headers["x-content-type-options"] == "nosniff", path
        assert reply.headers["x-frame-options"] == "DENY", path
        assert reply.headers["referrer-policy"] == "no-referrer", path
    page = await client.get("/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert "<script>" not in page.text and " on" not in page.text.replace("\n", " ").split("<body")[1].split(">")[0]


async def test_logs_need_the_admin_key(app) -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queen")
    denied = await client.get("/api/web/logs", params={"node": "here"}, headers={"Authorization": f"Bearer {APP}"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "wrong_key_scope"
    missing = await client.get("/api/web/logs", params={"node": "here"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert missing.status_code == 404  # the admin gets as far as the node


class Opened:
    """A GET held open as a browser holds the page's stream; ``close`` is the client going away."""

    def __init__(self, app, path: str, key: str, scheme: str = "Bearer ") -> None:
        self.gone = asyncio.Event()
        self.started: asyncio.Future = asyncio.get_running_loop().create_future()
        self.body = b""

        async def receive() -> dict:
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start" and not self.started.done():
                self.started.set_result(message["status"])
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"authorization", f"{scheme}{key}".encode())], "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        self.task = asyncio.ensure_future(app(scope, receive, send))

    async def status(self) -> int:
        return await asyncio.wait_for(self.started, 10)

    async def close(self) -> None:
        self.gone.set()
        await asyncio.wait_for(self.task, 10)


async def test_streams_are_capped_per_key_and_in_all_and_given_back(app, monkeypatch) -> None:
    async def held(_queen):
        yield b": open\n\n"
        await asyncio.sleep(3600)

    monkeypatch.setattr(web.events, "cluster_events", held)

    async def open_many(keys: list[str]) -> tuple[list[Opened], list[int]]:
        # All sent before any is answered: requests arriving together.
        opened = [Opened(app, "/api/web/events", k) for k in keys]
        return opened, [await o.status() for o in opened]

    first, codes = await open_many([APP] * (web.MAX_STREAMS_PER_KEY + 8))
    assert codes.count(200) == web.MAX_STREAMS_PER_KEY and codes.count(429) == 8
    # The same key written another way is still that key.
    spelled = [Opened(app, "/api/web/events", APP, scheme) for scheme in ("bearer ", "BEARER  ", "Bearer   ")]
    assert [await o.status() for o in spelled] == [429, 429, 429]
    first += spelled
    refused = first[codes.index(429)]
    await refused.close()
    assert b'"code":"too_many_streams"' in refused.body and b"one key" in refused.body
    # Other keys still get in, up to the bound of all keys together.
    more, codes = await open_many([k for k in [APP2, *OTHERS] for _ in range(web.MAX_STREAMS_PER_KEY + 2)])
    assert codes.count(200) == web.MAX_STREAMS - web.MAX_STREAMS_PER_KEY == 3 * web.MAX_STREAMS_PER_KEY
    assert app.state.web_streams == web.MAX_STREAMS
    extra, codes = await open_many([ADMIN])
    assert codes == [429]
    assert b"64 in all" in (await extra[0].close() or extra[0].body)
    # Streams that end give their slots back.
    for o in first + more + extra:
        if not o.task.done():
            await o.close()
    assert app.state.web_streams == 0 and app.state.web_streams_by_key == {}
    again, codes = await open_many([APP])
    assert codes == [200]
    await again[0].close()


def test_the_admin_key_is_compared_as_digests_of_one_length(monkeypatch) -> None:
    """hmac.compare_digest on inputs of different lengths returns at once: comparing
    the keys themselves would say the admin key's length to whoever times it."""
    from rbee_queen.http import auth

    lengths: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        lengths.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    checker = Authenticator(ADMIN)
    for token in ("x", ADMIN[:-1], ADMIN + "x", "y" * 500):
        assert checker.scope_of(token) is None
    assert checker.scope_of(ADMIN) == "admin"
    assert set(lengths) == {(32, 32)}


async def test_a_chat_of_more_messages_than_the_worker_takes_is_a_400_naming_messages(app) -> None:
    from rbee.bounds import CHAT_MESSAGES

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queen")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * (CHAT_MESSAGES.limit + 1)}
    reply = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {APP}"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert str(CHAT_MESSAGES.limit) in reply.json()["error"]["message"]


def test_names_and_narration_cannot_forge_server_sent_events() -> None:
    from rbee_queen.http import events, sse

    forged = 'x\r\n\r\ndata: {"forged": true}\n\nevent: snapshot\rdata: 1'
    for wire in (sse.data({"model": forged}), sse.comment(forged), events.sse("line", {"line": forged}).decode()):
        body = wire.removesuffix("\n\n")
        assert "\n" not in body.replace("event: line\ndata: ", "", 1) and "\r" not in body, wire


async def test_no_cross_origin_access_is_granted(app) -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queen")
    origin = {"Origin": "https://elsewhere.example"}
    preflight = await client.options("/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})  # fmt: skip
    reply = await client.get("/api/web/me", headers={**origin, "Authorization": f"Bearer {APP}"})
    assert reply.status_code == 200
    for r in (preflight, reply):
        assert not any(k.startswith("access-control-") for k in r.headers), r.headers
