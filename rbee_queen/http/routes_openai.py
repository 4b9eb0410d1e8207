"""OpenAI's routes: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, streaming (SSE) and not (docs/openai-api.md).

The key is checked before the body is read as JSON; the body's errors name
the parameter. A stream's status is decided by the worker's first answer:
a busy worker is still a 429, while anything after the first byte (a cold
start's failure, the worker dying) is one ``data: {"error": ...}`` event and
the end of the stream. A client that goes away ends the Generate call, which
cancels the request on the worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from rbee.errors import RbeeError
from rbee.scopes import Scope

from rbee_queen.http import sse
from rbee_queen.http.convert import chat_request, completion_request, new_request_id
from rbee_queen.http.errors import ApiError, from_rbee, internal, validation_error
from rbee_queen.http.observe import ProxyObserver
from rbee_queen.http.openai_models import ChatCompletionRequest, CompletionRequest, Sampling
from rbee_queen.http.routing import ColdStart, Router
from rbee_queen.http.shapes import Collected, chat_logprobs, completion_logprobs, ends, now, usage
from rbee_queen.http.upstream import WorkerLease

router = APIRouter()
# A request body larger than this is refused (413) before it is parsed.
MAX_BODY_BYTES = 8 * 1024 * 1024
# While a cold start runs, a streaming client hears from us at least this often.
KEEPALIVE_S = 10.0
# How often a non-streaming request looks whether its client is still there.
DISCONNECT_POLL_S = 0.25
# X-Rbee-Node names a node (node names are short).
MAX_NODE_HEADER = 128
# Codes after which a worker's cached address and key are looked up again.
STALE_WORKER = {"WORKER_UNREACHABLE", "INVALID_API_KEY", "MISSING_API_KEY", "STREAM_BROKEN", "CONNECTION_TIMEOUT"}


def _router(request: Request) -> Router:
    return request.app.state.router


def _observer(request: Request) -> ProxyObserver:
    return getattr(request.app.state, "observer", None) or ProxyObserver()


async def _body(request: Request, model: type[BaseModel]) -> Any:
    request.app.state.auth.check(request, Scope.INFERENCE.value)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes", None, "request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes", None, "request_too_large")
    try:
        return model.model_validate_json(bytes(raw))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    request.app.state.auth.check(request, Scope.INFERENCE.value)
    models = await _router(request).models.all()
    return {"object": "list", "data": [m.as_openai() for m in models]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    request.app.state.auth.check(request, Scope.INFERENCE.value)
    for m in await _router(request).models.all():
        if m.ref == model:
            return m.as_openai()
    raise ApiError(404, f"The model {model[:200]!r} does not exist in this cluster (see GET /v1/models)", "model", "model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _serve(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _serve(request, "completion")


@dataclass
class _Call:
    """One request on its way: what it asked, where it goes, what to write."""

    kind: str
    body: Sampling
    generate: Any
    rid: str
    model: str
    ref: str
    n: int
    created: int
    arrived: float
    node: str = ""

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def chunk(self, choices: list[dict[str, Any]], usage_value: Any = ..., with_usage: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            out["usage"] = None if usage_value is ... else usage_value
        return out


async def _serve(request: Request, kind: str) -> Any:
    arrived = time.monotonic()
    observer = _observer(request)
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    try:
        if kind == "chat":
            body = await _body(request, ChatCompletionRequest)
            rid = new_request_id("chatcmpl")
            generate = chat_request(body, rid)
        else:
            body = await _body(request, CompletionRequest)
            rid = new_request_id("cmpl")
            generate = completion_request(body, rid)
        r = _router(request)
        node = request.headers.get("x-rbee-node")
        if node is not None and len(node) > MAX_NODE_HEADER:
            raise ApiError(400, f"X-Rbee-Node: at most {MAX_NODE_HEADER} characters", "X-Rbee-Node", "invalid_value")
        # A request may wait in the admission queue here: a client that leaves meanwhile leaves the line.
        routed = asyncio.ensure_future(r.route(body.model, node))
        if not await _unless_gone(request, routed):
            observer.request_refused(route, 499)
            return JSONResponse({}, status_code=499)
        ref, lease, cold = routed.result()
    except ApiError as err:
        observer.request_refused(route, err.status)
        raise
    except RbeeError as err:
        observer.request_refused(route, from_rbee(err).status)
        raise
    if body.request_id:
        rid = generate.request_id
    call = _Call(kind, body, generate, rid, body.model, ref, body.n or 1, now(), arrived,
                 lease.node if lease else cold.node if cold else "")  # fmt: skip
    observer.request_started(route, ref, call.node)
    if not body.stream:
        return await _whole(request, r, call, lease, cold, observer)
    events = _stream(r, call, lease, cold, observer)
    try:
        first = await events.__anext__()
    except RbeeError as err:
        raise from_rbee(err) from None
    return StreamingResponse(_prepend(first, events), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


@contextlib.asynccontextmanager
async def _kept(r: Router, call: _Call, lease: WorkerLease) -> AsyncIterator[None]:
    """The request as its worker's keep-alive sees it (rbee_queen/keepalive.py);
    asynchronous, as it sits in ``async with`` beside ``r.using``."""
    keepalive = getattr(r.tasks, "keepalive", None)
    if keepalive is None:
        yield
        return
    with keepalive.request(lease.node, lease.worker_id, lease.model_ref, call.body.keep_alive):
        yield


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


async def _whole(request: Request, r: Router, call: _Call, lease: WorkerLease | None, cold: ColdStart | None,
                 observer: ProxyObserver) -> JSONResponse:  # fmt: skip
    status = 500
    collected = Collected(call.n, call.kind == "completion")
    picked = lease is not None  # reserved by the router's pick(), not from a cold start
    seen = False
    last = 0.0
    try:
        if lease is None:
            assert cold is not None
            lease = await r.wait_cold(cold)
            call.node = call.node or lease.node  # placed by the start itself
        async def collect() -> None:
            nonlocal seen, last
            async for msg in r.channels.generate(lease, call.generate):
                if msg.HasField("delta"):
                    at = time.monotonic()
                    if not seen:
                        seen = True
                        observer.first_token(call.route, call.ref, call.node, at - call.arrived)
                    else:
                        observer.tokens(call.route, call.ref, call.node, len(msg.delta.token_ids), at - last)
                    last = at
                    collected.add(msg.delta)
                else:
                    collected.final = msg.final

        async with r.using(lease, picked), _kept(r, call, lease):
            try:
                if not await _unless_gone(request, collect()):
                    status = 499  # the client went away: the Generate call was cancelled on the worker
                    return JSONResponse({}, status_code=499)
            except RbeeError as err:
                if err.code in STALE_WORKER:
                    r.forget(lease)
                raise
        if collected.final is None:
            raise RbeeError("STREAM_BROKEN", "The worker ended the stream without its final message", {"model": call.ref})
        body = collected.chat(call.rid, call.model, call.created) if call.kind == "chat" else collected.completion(call.rid, call.model, call.created)
        status = 200
        return JSONResponse(body)
    except RbeeError as err:
        status = from_rbee(err).status
        raise
    except ApiError as err:
        status = err.status
        raise
    finally:
        final = collected.final
        observer.request_finished(call.route, call.ref, call.node, status, time.monotonic() - call.arrived,
                                  final.prompt_tokens if final else 0, final.tokens_generated if final else 0)  # fmt: skip


async def _unless_gone(request: Request, work) -> bool:
    """Run ``work`` unless the client disconnects first (then it is cancelled,
    which ends its Generate call and so the request on the worker). True
    when ``work`` finished."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()
    return True


async def _wait_cold(r: Router, call: _Call, cold: ColdStart) -> AsyncIterator[str | WorkerLease]:
    """Comment lines with the cold start's stages, then the lease."""
    yield sse.comment(f"rbee: loading {call.ref} on {cold.node}" if cold.node else f"rbee: placing {call.ref}")
    for line in list(cold.stages):
        yield sse.comment(line)
    stages: asyncio.Queue[str] = asyncio.Queue()
    waiter = asyncio.ensure_future(r.wait_cold(cold, stages.put_nowait))
    try:
        while True:
            getter = asyncio.ensure_future(stages.get())
            done, _ = await asyncio.wait({waiter, getter}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield sse.comment(getter.result())
            else:
                getter.cancel()
            if waiter in done:
                while not stages.empty():
                    yield sse.comment(stages.get_nowait())
                yield waiter.result()
                return
            if not done:
                yield sse.comment("rbee: still loading")
    finally:
        if not waiter.done():
            waiter.cancel()


async def _stream(r: Router, call: _Call, lease: WorkerLease | None, cold: ColdStart | None,
                  observer: ProxyObserver) -> AsyncIterator[str]:  # fmt: skip
    opts = call.body.stream_options
    with_usage = bool(opts and opts.include_usage)
    continuous = bool(with_usage and opts and opts.continuous_usage_stats)
    status = 200
    prompt_tokens = generated = 0
    committed = False
    picked = lease is not None  # reserved by the router's pick(), not from a cold start
    # The final message came: the call is read to its end (the worker has freed
    # the slot then) so a request queued for it finds it free.
    ended = False
    try:
        if lease is None:
            assert cold is not None
            committed = True
            async for item in _wait_cold(r, call, cold):
                if isinstance(item, WorkerLease):
                    lease = item
                    call.node = call.node or lease.node  # placed by the start itself
                else:
                    yield item
        assert lease is not None
        async with r.using(lease, picked), _kept(r, call, lease):
            began: set[int] = set()
            offsets = [0] * call.n
            last = time.monotonic()
            first = True
            try:
                async for msg in r.channels.generate(lease, call.generate):
                    if ended:
                        continue
                    if msg.HasField("final"):
                        final = msg.final
                        prompt_tokens, generated = final.prompt_tokens, final.tokens_generated
                        for i, (reason, matched) in sorted(ends(final, call.n).items()):
                            if call.kind == "chat":
                                delta = {} if i in began else {"role": "assistant", "content": ""}
                                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason, "stop_reason": matched}
                            else:
                                choice = {"index": i, "text": "", "logprobs": None, "finish_reason": reason, "stop_reason": matched}
                            yield sse.data(call.chunk([choice], None, with_usage))
                        if with_usage:
                            total = usage(final.prompt_tokens, final.tokens_generated, final.cached_tokens)
                            yield sse.data(call.chunk([], total, True))
                        yield sse.DONE
                        ended = True
                        continue
                    d = msg.delta
                    at = time.monotonic()
                    if first:  # also after a cold start's comment lines
                        first = False
                        observer.first_token(call.route, call.ref, call.node, at - call.arrived)
                    else:
                        observer.tokens(call.route, call.ref, call.node, len(d.token_ids), at - last)
                    last = at
                    committed = True
                    i = d.completion if d.completion < call.n else 0
                    running = usage(d.prompt_tokens, d.completion_tokens, d.cached_tokens) if continuous else None
                    prompt_tokens, generated = d.prompt_tokens, d.completion_tokens
                    if call.kind == "chat":
                        delta: dict[str, Any] = {"content": d.text}
                        if i not in began:
                            delta = {"role": "assistant", "content": d.text}
                            began.add(i)
                        choice = {"index": i, "delta": delta, "logprobs": chat_logprobs(d.logprobs) if d.logprobs else None,
                                  "finish_reason": None}  # fmt: skip
                    else:
                        lp = None
                        if d.logprobs:
                            lp, offsets[i] = completion_logprobs(d.logprobs, offsets[i])
                        else:
                            offsets[i] += len(d.text)
                        choice = {"index": i, "text": d.text, "logprobs": lp, "finish_reason": None}
                    yield sse.data(call.chunk([choice], running, with_usage))
            except RbeeError as err:
                if err.code in STALE_WORKER:
                    r.forget(lease)
                raise
        if ended:
            return
        raise RbeeError("STREAM_BROKEN", "The worker ended the stream without its final message", {"model": call.ref})
    except (RbeeError, ApiError) as err:
        if ended:  # the answer is whole: what broke after it is the call's end, not the client's business
            return
        api = err if isinstance(err, ApiError) else from_rbee(err)
        status = api.status
        if not committed:
            raise
        yield api.sse_data()
    except (asyncio.CancelledError, GeneratorExit):
        status = status if ended else 499  # the client went away: the Generate call is cancelled on the way out
        raise
    except Exception as exc:  # noqa: BLE001 - the stream has begun; end it with an error id
        api = internal(exc, call.route)
        status = api.status
        if not committed:
            raise api from None
        yield api.sse_data()
    finally:
        observer.request_finished(call.route, call.ref, call.node, status, time.monotonic() - call.arrived,
                                  prompt_tokens, generated)  # fmt: skip
