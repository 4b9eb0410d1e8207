"""API keys: the server interceptors that guard every RPC but health (by scope,
rbee/scopes.py), and the client-side metadata. Keys are compared in constant
time and never logged."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from rbee.errors import RbeeError
from rbee.scopes import Scope, is_open, required_scope

log = logging.getLogger(__name__)

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


def argv_key_warning(env_var: str, file_hint: str) -> str:
    """What a daemon says when its key came in argv (S13: never in argv)."""
    return (
        f"--api-key on the command line can be read by other users of this machine (ps, /proc/*/cmdline); "
        f"set {env_var} or use {file_hint} (mode 600) instead"
    )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _presented_key(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, RbeeError | None]:
    """The bearer key in the metadata, or the error for its absence or form."""
    header = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            header = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            break
    if not header:
        return "", RbeeError(
            "MISSING_API_KEY",
            "Missing API key: this RPC requires 'authorization: Bearer <key>'",
            suggestions=["Pass --api-key or set it in the config file"],
        )
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return "", RbeeError(
            "INVALID_API_KEY",
            "Invalid API key: expected 'authorization: Bearer <key>'",
            suggestions=["Pass --api-key or set it in the config file"],
        )
    return presented.strip(), None


def _invalid_key() -> RbeeError:
    return RbeeError(
        "INVALID_API_KEY",
        "Invalid API key",
        suggestions=["Check the API key configured for this daemon"],
    )


def _same(presented: bytes, key: str) -> bool:
    return bool(key) and hmac.compare_digest(presented, key.encode("utf-8", "replace"))


def check_key(metadata: Iterable[tuple[str, Any]] | None, expected: str) -> RbeeError | None:
    """None when the metadata carries the expected key, else the error to return."""
    presented, err = _presented_key(metadata)
    if err is not None:
        return err
    return None if _same(presented.encode("utf-8", "replace"), expected) else _invalid_key()


# The keys a daemon knows, each with its scope, produced on demand (a hive's
# change with its workers). Own keys first: the search stops at the first key
# that opens the RPC, so what comes later (e.g. read from a store) is looked at
# only for keys that do not.
KeyRing = Callable[[], Iterable[tuple[Scope, str]]]

_SCOPE_ADVICE = {
    Scope.ADMIN: "Use this daemon's admin key (a hive: its node key, which the queen keeps; the queen: queen.key; "
    "a worker: only its hive holds it, so stop workers through the hive: `rbee-keeper workers shutdown --id ID`)",
    Scope.INFERENCE: "Use the worker's own key: the one its spawn or the task that started it returned",
    Scope.CALLBACK: "Only a worker this hive started reports here, with the key the hive gave it at spawn",
}


def static_ring(*entries: tuple[Scope, str]) -> KeyRing:
    fixed = tuple((scope, key) for scope, key in entries if key)
    return lambda: fixed


def authorize(metadata: Iterable[tuple[str, Any]] | None, method: str, ring: KeyRing) -> RbeeError | None:
    """None when the presented key has the scope ``method`` needs (rbee/scopes.py).
    Missing or unknown keys as S10; a known key of another scope is
    WRONG_KEY_SCOPE (PERMISSION_DENIED); a method the table does not name is
    refused whatever the key."""
    required = required_scope(method)
    presented, err = _presented_key(metadata)
    if err is not None:
        return err
    if required is None:
        log.error("RPC %s has no scope in rbee/scopes.py: refused", method)
        return RbeeError(
            "WRONG_KEY_SCOPE",
            f"{method} has no declared key scope, so no key opens it",
            {"rpc": method},
            ["This is a bug in this rbee version: the RPC is missing from rbee/scopes.py"],
        )
    wire = presented.encode("utf-8", "replace")
    granted: set[Scope] = set()
    for scope, key in ring():
        if _same(wire, key):
            if scope == required:
                return None
            granted.add(scope)
    if not granted:
        return _invalid_key()
    held = ", ".join(sorted(str(s) for s in granted))
    return RbeeError(
        "WRONG_KEY_SCOPE",
        f"This key does not open {method}: it is a key of scope '{held}', and the RPC needs the '{required}' key",
        {"rpc": method, "required_scope": str(required), "key_scope": held},
        [_SCOPE_ADVICE[required]],
    )


def _rejecting_handler(handler: grpc.RpcMethodHandler, err: RbeeError) -> grpc.RpcMethodHandler:
    """A handler that refuses with ``err`` without reading the request.

    grpc's asyncio server reads a unary request whole before it calls the
    handler, whatever the handler does with it: a refusal declared unary would
    still take in every byte an unauthenticated client sends (up to the
    receive limit, per call). Declared as request-streaming, the handler is
    called at once, never reads, and the call ends with the status; the
    client sees the same status either way (bench/limits.py measures it)."""
    status = err.to_status()

    async def reject_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)

    async def reject_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject_stream, **kw)
    return grpc.stream_unary_rpc_method_handler(reject_unary, **kw)


class CheckingInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health whose call fails ``check``: the RPC's
    handler answers the error instead of running. Subclasses say what is checked."""

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None, method: str) -> RbeeError | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open(method):
            return handler
        err = self.check(handler_call_details.invocation_metadata, method)
        return handler if err is None else _rejecting_handler(handler, err)


class ScopedKeyInterceptor(CheckingInterceptor):
    """Every RPC but health needs a key of the scope rbee/scopes.py declares for
    it; the daemon's ``ring`` says which keys it knows and of which scope."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    def __repr__(self) -> str:  # never show a key
        return "ScopedKeyInterceptor(keys=***)"

    def check(self, metadata, method: str) -> RbeeError | None:
        return authorize(metadata, method, self._ring)
