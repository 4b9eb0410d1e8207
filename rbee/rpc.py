"""Servicer helpers: turn RbeeError (and stray exceptions) into gRPC statuses
in one place, for unary and server-streaming handlers alike."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from rbee.errors import RbeeError

log = logging.getLogger(__name__)


def _internal(exc: BaseException) -> RbeeError:
    # The reply never carries a traceback; the log does.
    return RbeeError("INTERNAL", f"Internal error: {type(exc).__name__}: {exc}")


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
                log.exception("unhandled error in %s", fn.__qualname__)
                await context.abort_with_status(_internal(exc).to_status())

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
            log.exception("unhandled error in %s", fn.__qualname__)
            await context.abort_with_status(_internal(exc).to_status())

    return unary_wrapper
