"""API keys: a server interceptor that guards every RPC but health, and the
client-side metadata. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from rbee.errors import RbeeError

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def read_key_file(path: Path, setting: str) -> str:
    """The key held in ``path`` (first line, stripped). A missing, empty or
    group/world-readable file is refused: the key would not be secret."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text().strip()
    except OSError as exc:
        raise RbeeError(
            "MISSING_API_KEY",
            f"Cannot read the API key file {path}: {exc.strerror or exc}",
            {"path": str(path), "setting": setting},
            [f"Create it with the key on one line and `chmod 600 {path}`"],
        ) from None
    if mode & 0o077:
        raise RbeeError(
            "INVALID_API_KEY",
            f"The API key file {path} is readable by other users (mode {mode:03o})",
            {"path": str(path), "mode": f"{mode:03o}"},
            [f"Run `chmod 600 {path}`"],
        )
    key = text.splitlines()[0].strip() if text else ""
    if not key:
        raise RbeeError("MISSING_API_KEY", f"The API key file {path} is empty", {"path": str(path), "setting": setting})
    return key


def write_key_file(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` created 0600 (its folder 0700 when created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.chmod(path, 0o600)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def check_key(metadata: Iterable[tuple[str, Any]] | None, expected: str) -> RbeeError | None:
    """None when the metadata carries the expected key, else the error to return."""
    header = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            header = value.decode() if isinstance(value, bytes) else str(value)
            break
    if not header:
        return RbeeError(
            "MISSING_API_KEY",
            "Missing API key: this RPC requires 'authorization: Bearer <key>'",
            suggestions=["Pass --api-key or set it in the config file"],
        )
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return RbeeError(
            "INVALID_API_KEY",
            "Invalid API key: expected 'authorization: Bearer <key>'",
            suggestions=["Pass --api-key or set it in the config file"],
        )
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        return RbeeError(
            "INVALID_API_KEY",
            "Invalid API key",
            suggestions=["Check the API key configured for this daemon"],
        )
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, err: RbeeError) -> grpc.RpcMethodHandler:
    status = err.to_status()

    async def reject_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(reject_unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(reject_stream, **kw)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call without the right bearer key, health excepted."""

    def __init__(self, api_key: str, open_prefixes: Iterable[str] = OPEN_SERVICES) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        self._key = api_key
        self._open = tuple(open_prefixes)

    def __repr__(self) -> str:  # never show the key
        return "ApiKeyInterceptor(key=***)"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        err = check_key(handler_call_details.invocation_metadata, self._key)
        return handler if err is None else _rejecting_handler(handler, err)
