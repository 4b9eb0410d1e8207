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
