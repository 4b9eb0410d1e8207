"""Servicer helpers: turn RbeeError (and stray exceptions) into gRPC statuses
in one place, for unary and server-streaming handlers alike."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from rbee.errors import RbeeError

log = logging.getLogger(__name__)

# Where this process's log is, as a reply may tell a client; each daemon sets
# it once at start (one process, one log).
_log_location = "the daemon's log"


def set_log_location(where: str) -> None:
    global _log_location
    _log_location = where


def internal_error(
    exc: BaseException, where: str, what: str = "Internal error", details: dict[str, Any] | None = None
) -> RbeeError:
    """An unexpected exception, as a client sees it: that it happened, an id
    and where the log is. The exception's text can hold paths, names and data
    of the node, so it goes to the log (with the traceback) and never out."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s %s in %s", what, error_id, where, exc_info=exc)
    return RbeeError(
        "INTERNAL",
        f"{what} (id {error_id}); the details are in {_log_location}",
        {**(details or {}), "error_id": error_id, "log": _log_location},
        [f"Look for {error_id} in {_log_location}"],
    )


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a servicer method so that RbeeError becomes a proper status."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except RbeeError as err:
                await context.abort_with_status(err.to_status())
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - last line of defence
                await context.abort_with_status(internal_error(exc, fn.__qualname__).to_status())

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except RbeeError as err:
            await context.abort_with_status(err.to_status())
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort_with_status(internal_error(exc, fn.__qualname__).to_status())

    return unary_wrapper


class _Malformed:
    """Stands for a request whose bytes did not parse as its message type."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _malformed_request(method: str, size: int) -> RbeeError:
    return RbeeError(
        "INVALID_ARGUMENT",
        f"The request to {method} is not a valid message of its type ({size} bytes that do not parse)",
        {"rpc": method, "field": "request", "bytes": size},
        ["Use a client built from protos/rbee/v1 of this rbee version"],
    )


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data) if parse is not None else data
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed request
            return _Malformed(len(data))

    kw = dict(request_deserializer=deserialize, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort_with_status(_malformed_request(method, request.size).to_status())
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        stream_behavior = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort_with_status(_malformed_request(method, request.size).to_status())
                return
            responses = stream_behavior(request, context)
            try:
                async for item in responses:
                    yield item
            finally:
                await responses.aclose()

        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return handler


class RequestGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the RPC's request message are answered as an
    rbee INVALID_ARGUMENT, not with gRPC's UNKNOWN and the parser's exception
    text. rbee's services only (health is grpc's own)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or not method.startswith("/rbee."):
            return handler
        return _guarded(handler, method)
