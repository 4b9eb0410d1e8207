"""What every request to the queen's HTTP port passes before any route sees
it (docs/security.md, "The HTTP port"):

- **No body without a key.** A request that carries a body (a
  ``Content-Length`` above 0, or chunked) must present a valid key first,
  else 401. The body is not read nor parsed (FastAPI reads and parses a
  route's JSON body before its key dependency runs); one announced beyond
  ``DRAIN_BYTES``, or chunked, also has its connection closed, since uvicorn
  would drain it to keep the connection (a smaller one is discarded so that
  its client surely reads the 401).
- **Bounded bodies.** At most ``MAX_BODY_BYTES`` on the OpenAI routes and
  ``MAX_PAGE_BODY_BYTES`` elsewhere (the web page's actions are a few
  fields): a larger ``Content-Length`` is 413 before a byte is read (uvicorn
  discards the rest as it comes, so the client can read the 413), a chunked
  body is cut at the bound and its connection closed, 413 in OpenAI's error
  shape either way.
- **Bounded heads.** A request line and headers past ``MAX_HEAD_BYTES`` get 431
  and the connection closed (``http_protocol``, uvicorn's httptools parser).
- **Headers for browsers** on every response: ``nosniff``, no framing, no
  referrer (the page's own files add their Content-Security-Policy).
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbee_queen.http.errors import ApiError

MIB = 1 << 20
# A chat request with a long context (128k tokens of text is well under 1 MiB) fits many times over.
MAX_BODY_BYTES = 8 * MIB
# The page's actions (stop a worker, start a download) are a few hundred bytes.
MAX_PAGE_BODY_BYTES = 64 * 1024
# What uvicorn may discard of a refused request's body to keep its connection.
DRAIN_BYTES = 64 * 1024
BROWSER_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` past the bound: the route's body reading stops there."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit).message, headers={"Connection": "close"})
        self.limit = limit


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes", None, "request_too_large")


def body_limit(path: str) -> int:
    return MAX_BODY_BYTES if path.startswith("/v1/") else MAX_PAGE_BODY_BYTES


def _key_opens_something(app: Any, headers: dict[bytes, bytes]) -> bool:
    auth = getattr(getattr(app, "state", None), "auth", None)
    if auth is None:
        return False
    kind, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return kind.lower() == "bearer" and auth.scope_of(token.strip()) is not None


class RequestGuard:
    """Pure ASGI middleware (nothing of the body is buffered here)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in BROWSER_HEADERS.items() if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), value)
        length_header = headers.get(b"content-length")
        chunked = b"transfer-encoding" in headers
        try:
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            length = -1
        if length == 0 and not chunked:
            await self.app(scope, receive, send_with_headers)
            return
        if not _key_opens_something(scope.get("app"), headers):
            refused = ApiError(401, "A request with a body needs a valid key: send it as `Authorization: Bearer KEY` "
                               "(make one with `rbee-keeper keys create --name NAME`)", None, "invalid_api_key")  # fmt: skip
            # A body small enough is discarded unread and the connection kept (its client
            # then surely reads the 401); a larger one, or chunked, closes it.
            await _refuse(refused, scope, receive, send_with_headers, close=chunked or length > DRAIN_BYTES)
            return
        limit = body_limit(scope.get("path", ""))
        if length < 0 or length > limit:
            # A key holder's client reads this 413 once it has sent what it announced
            # (uvicorn discards it unread); closing now would show it a broken pipe.
            await too_large(limit).response()(scope, receive, send_with_headers)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, bounded, send_with_headers)


async def _refuse(error: ApiError, scope: Scope, receive: Receive, send: Send, close: bool) -> None:
    """The error; with ``close`` the connection is closed after it, the rest of the body unread."""
    response = error.response()
    if close:
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


# A request's line and headers: uvicorn's httptools parser buffers them without a bound
# (4 connections sending 20 MB of one header took a queen from 97 to 243 MB); h11 has its own 16 KiB.
MAX_HEAD_BYTES = 64 * 1024
_TOO_LARGE_HEAD = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def http_protocol() -> Any:
    """uvicorn's ``http`` setting: its httptools protocol with the head bounded, else "auto" (h11)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class BoundedHead(HttpToolsProtocol):  # type: ignore[misc, valid-type]
        _in_head = True
        _head = 0

        def on_message_begin(self) -> None:
            self._in_head, self._head = True, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head += len(data)
                if self._head > MAX_HEAD_BYTES:
                    self.transport.write(_TOO_LARGE_HEAD)
                    self.transport.close()

    return BoundedHead
