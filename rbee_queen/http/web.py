"""The cluster's web page on the queen's HTTP port (docs/web.md).

``GET /`` and ``GET /ui/FILE`` serve the page's static files (shipped in this
package, no build step; only the files in ``static/`` are reachable). Every
data route needs a key: any key that opens the OpenAI routes reads
(``inference`` scope), only the admin key acts (stop a worker, start a
download) and reads logs (as on the hive's gRPC, where logs need its admin
key): 401 without a valid key, 403 for a key
of the wrong scope. Event and log streams are bounded in all and per key.

Routes, all under ``/api/web``: ``me`` (the key's scope), ``events`` (the
live feed, server-sent events, events.py), ``logs`` (a hive's or a worker's
log, followed), ``workers/stop`` and ``models/download`` (admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rbee.errors import RbeeError
from rbee_queen.activity import error_dict
from rbee_queen.http import cluster_view, events
from rbee_queen.http.auth import admin_key, inference_key
from rbee_queen.http.errors import RBEE_STATUS, ApiError

STATIC = Path(__file__).with_name("static")
STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.(js|css|svg|png|html)$")
MEDIA = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml", "png": "image/png", "html": "text/html"}
# The page loads nothing from elsewhere and runs no inline code.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Open event and log streams at once, all pages together (each holds hive calls),
# and of those at most this many per key, so one key cannot take every slot.
MAX_STREAMS = 64
MAX_STREAMS_PER_KEY = 16

router = APIRouter()


def _queen(request: Request) -> Any:
    queen = request.app.state.queen
    if queen is None:
        raise ApiError(503, "The web page needs the queen (this app was built without it)", None, "unavailable")
    return queen


def _failure(err: RbeeError) -> JSONResponse:
    """An rbee error for the page: OpenAI's error shape plus rbee's code, details and suggestions."""
    status = RBEE_STATUS.get(err.code) or (404 if err.code.endswith("_NOT_FOUND") else 502)
    body = ApiError(status, err.message, err.details.get("field"), err.code.lower()).body()
    body["error"]["rbee"] = error_dict(err)
    return JSONResponse(body, status_code=status)


def _key_id(request: Request) -> str:
    """Which key a request presented, as a digest (the key itself is not kept)."""
    # The token as the key check reads it: "bearer  KEY" and "Bearer KEY" are one key.
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class _CountedStream(StreamingResponse):
    """Gives its stream slot back however the response ends, also when it never started."""

    def __init__(self, body: AsyncIterator[bytes], release: Any) -> None:
        super().__init__(body, media_type="text/event-stream", headers=STREAM_HEADERS)
        self._release = release
        self._body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            with contextlib.suppress(BaseException):
                await self._body.aclose()  # type: ignore[attr-defined]


def _stream(request: Request, body: AsyncIterator[bytes]) -> StreamingResponse:
    """A server-sent event response holding a slot from now until it ends;
    429 beyond MAX_STREAMS in all or MAX_STREAMS_PER_KEY for the request's key."""
    state = request.app.state
    if not hasattr(state, "web_streams_by_key"):
        state.web_streams, state.web_streams_by_key = getattr(state, "web_streams", 0), {}
    who = _key_id(request)
    mine = state.web_streams_by_key.get(who, 0)
    if state.web_streams >= MAX_STREAMS or mine >= MAX_STREAMS_PER_KEY:
        limit = f"{MAX_STREAMS_PER_KEY} for one key" if mine >= MAX_STREAMS_PER_KEY else f"{MAX_STREAMS} in all"
        raise ApiError(429, f"Too many open streams ({limit}): close a tab of the page or a log", None,
                       "too_many_streams", retry_after=5)  # fmt: skip
    # Taken before the response is returned: requests arriving together cannot all pass the check.
    state.web_streams += 1
    state.web_streams_by_key[who] = mine + 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        state.web_streams -= 1
        left = state.web_streams_by_key.get(who, 1) - 1
        if left > 0:
            state.web_streams_by_key[who] = left
        else:
            state.web_streams_by_key.pop(who, None)

    return _CountedStream(body, release)


# -- the page ---------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/ui/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    path = STATIC / name
    if not STATIC_NAME.match(name) or not path.is_file():
        raise ApiError(404, "No such file", None, "not_found")
    return FileResponse(path, media_type=MEDIA[name.rpartition(".")[2]], headers=SECURITY_HEADERS)


# -- reading (any valid key) -----------------------------------------------------------------


@router.get("/api/web/me")
async def me(scope: str = Depends(inference_key)) -> dict:
    return {"scope": scope, "can_act": scope == "admin"}


@router.get("/api/web/events")
async def cluster_events(request: Request, _scope: str = Depends(inference_key)) -> StreamingResponse:
    return _stream(request, events.cluster_events(_queen(request)))


@router.get("/api/web/logs")
async def logs(request: Request, node: str, worker: str = "", tail: int = cluster_view.LOG_TAIL_LINES,
               _scope: str = Depends(admin_key)) -> Any:  # fmt: skip
    queen = _queen(request)
    if not 1 <= tail <= 5000:
        raise ApiError(400, "tail must be between 1 and 5000 lines", "tail", "invalid_value")
    try:
        await asyncio.to_thread(queen.store.get, node)  # NODE_NOT_FOUND before the stream starts
        if worker and worker != "rbee-hive":
            cluster_view.check_worker_id(worker)
    except RbeeError as err:
        return _failure(err)
    lines = cluster_view.follow_logs(queen, node, worker, tail)
    return _stream(request, events.log_events(lines))


# -- acting (admin key only) ------------------------------------------------------------------


class StopWorker(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str = Field(min_length=1, max_length=64)
    worker_id: str = Field(min_length=1, max_length=128)


class Download(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=1000)
    backend: str = Field("", max_length=16)


@router.post("/api/web/workers/stop")
async def stop_worker(body: StopWorker, request: Request, _scope: str = Depends(admin_key)) -> Any:
    try:
        queen = _queen(request)
        return await cluster_view.stop_worker(queen, queen.tasks.activity, body.node, body.worker_id)
    except RbeeError as err:
        return _failure(err)


@router.post("/api/web/models/download", status_code=202)
async def download(body: Download, request: Request, _scope: str = Depends(admin_key)) -> Any:
    queen = _queen(request)
    try:
        return await cluster_view.start_download(queen, queen.tasks.activity, body.node, body.model, body.backend)
    except RbeeError as err:
        return _failure(err)
