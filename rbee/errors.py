"""The error model shared by every program.

An error is a stable code, a human message, details (figures behind the
message) and suggestions. On the wire it is a gRPC status whose details are the
standard google.rpc ones: ``ErrorInfo`` (reason = code, domain "rbee", metadata =
details), ``Help`` (one link per suggestion) and, for a bad field, ``BadRequest``
(rbee/error_wire.py says exactly what goes where).
This module is the one place that maps codes to gRPC status codes and back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from rbee import error_wire

S = grpc.StatusCode

# code -> gRPC status code. Codes are data: add new ones here, not in callers.
CODES: dict[str, grpc.StatusCode] = {
    # input
    "INVALID_ARGUMENT": S.INVALID_ARGUMENT,
    "USAGE_ERROR": S.INVALID_ARGUMENT,
    # A config file with a key of the wrong type or an unknown key.
    "INVALID_CONFIG": S.INVALID_ARGUMENT,
    "INVALID_MODEL_REF": S.INVALID_ARGUMENT,
    # A node's git source that git could take for an option or a program
    # (a branch starting with '-', an ext:: or http:// repository).
    "INVALID_GIT_REF": S.INVALID_ARGUMENT,
    "INVALID_GIT_URL": S.INVALID_ARGUMENT,
    "INVALID_MODEL_FORMAT": S.INVALID_ARGUMENT,
    "INVALID_BACKEND": S.INVALID_ARGUMENT,
    # A keep-alive that is no duration (rbee_queen/keepalive.py).
    "INVALID_KEEP_ALIVE": S.INVALID_ARGUMENT,
    "INVALID_DEVICE": S.INVALID_ARGUMENT,
    "DEVICE_NOT_AVAILABLE": S.INVALID_ARGUMENT,
    "DUPLICATE_REQUEST_ID": S.ALREADY_EXISTS,
    "NODE_EXISTS": S.ALREADY_EXISTS,
    # An application key of that name exists already (rbee-keeper keys create).
    "APP_KEY_EXISTS": S.ALREADY_EXISTS,
    # auth
    "MISSING_API_KEY": S.UNAUTHENTICATED,
    "INVALID_API_KEY": S.UNAUTHENTICATED,
    "SSH_AUTH_FAILED": S.UNAUTHENTICATED,
    # The node's SSH host key is not recorded, or differs from the recorded one.
    "SSH_HOST_KEY_UNKNOWN": S.FAILED_PRECONDITION,
    "SSH_HOST_KEY_CHANGED": S.FAILED_PRECONDITION,
    "ACCESS_DENIED": S.PERMISSION_DENIED,
    # A key this daemon knows, of another scope than the RPC's (S13: an
    # inference key on an admin RPC, the admin key on the callback, ...).
    "WRONG_KEY_SCOPE": S.PERMISSION_DENIED,
    # A path from a request (model, worker source) outside what the hive's
    # operator allows: well-formed, refused by policy (S13 confinement).
    "PATH_NOT_ALLOWED": S.PERMISSION_DENIED,
    # not found
    "NOT_FOUND": S.NOT_FOUND,
    "MODEL_NOT_FOUND": S.NOT_FOUND,
    "WORKER_NOT_FOUND": S.NOT_FOUND,
    "NODE_NOT_FOUND": S.NOT_FOUND,
    "APP_KEY_NOT_FOUND": S.NOT_FOUND,
    # No deployment (models deploy) of that model at the queen.
    "DEPLOYMENT_NOT_FOUND": S.NOT_FOUND,
    "WORKER_BINARY_NOT_FOUND": S.NOT_FOUND,
    "SSH_KEY_NOT_FOUND": S.NOT_FOUND,
    # busy / memory / quota
    "ALL_SLOTS_BUSY": S.RESOURCE_EXHAUSTED,
    # A draining worker refuses new work as busy (S8).
    "WORKER_DRAINING": S.RESOURCE_EXHAUSTED,
    "INSUFFICIENT_RAM": S.RESOURCE_EXHAUSTED,
    "NO_NODE_FITS": S.RESOURCE_EXHAUSTED,
    "VRAM_EXHAUSTED": S.RESOURCE_EXHAUSTED,
    "INSUFFICIENT_DISK": S.RESOURCE_EXHAUSTED,
    "DISK_FULL": S.RESOURCE_EXHAUSTED,
    "NO_FREE_PORT": S.RESOURCE_EXHAUSTED,
    "PORT_IN_USE": S.RESOURCE_EXHAUSTED,
    # A follower of a stream (logs, worker changes, loading progress) that
    # fell its queue's bound behind and was dropped (rbee/fanout.py).
    "SLOW_FOLLOWER": S.RESOURCE_EXHAUSTED,
    # A message beyond gRPC's size limit (grpc's own RESOURCE_EXHAUSTED,
    # named with the limit; not a busy worker: no retry helps).
    "MESSAGE_TOO_LARGE": S.RESOURCE_EXHAUSTED,
    # A bare RESOURCE_EXHAUSTED from a peer that said nothing more.
    "RESOURCE_EXHAUSTED": S.RESOURCE_EXHAUSTED,
    # The queen holds at most this many application keys (each request checks them all).
    "APP_KEY_LIMIT": S.RESOURCE_EXHAUSTED,
    # The queen keeps at most this many deployments (each is reconciled in a loop).
    "DEPLOYMENT_LIMIT": S.RESOURCE_EXHAUSTED,
    # timeouts
    "DEADLINE_EXCEEDED": S.DEADLINE_EXCEEDED,
    "DOWNLOAD_TIMEOUT": S.DEADLINE_EXCEEDED,
    "LOADING_TIMEOUT": S.DEADLINE_EXCEEDED,
    "STREAM_STALLED": S.DEADLINE_EXCEEDED,
    # cancelled
    "CANCELLED": S.CANCELLED,
    # unreachable / not ready
    "UNAVAILABLE": S.UNAVAILABLE,
    "MODEL_LOADING": S.UNAVAILABLE,
    "HIVE_UNREACHABLE": S.UNAVAILABLE,
    "WORKER_UNREACHABLE": S.UNAVAILABLE,
    "SSH_CONNECTION_FAILED": S.UNAVAILABLE,
    # A client gave up connecting to a daemon after its attempts (S9: 3, with
    # 0/200/400 ms backoff): unreachable, whatever the last attempt's reason.
    "CONNECTION_TIMEOUT": S.UNAVAILABLE,
    "STREAM_BROKEN": S.UNAVAILABLE,
    "TLS_HANDSHAKE_FAILED": S.UNAVAILABLE,
    # Enrolment of a keeper (rbee_queen/enrol.py): a token unknown, used or
    # expired; a queen whose CA is not the token's.
    "ENROL_TOKEN_INVALID": S.PERMISSION_DENIED,
    "ENROL_CA_MISMATCH": S.FAILED_PRECONDITION,
    # preconditions
    "BACKEND_UNAVAILABLE": S.FAILED_PRECONDITION,
    "CUDA_NOT_AVAILABLE": S.FAILED_PRECONDITION,
    "MODEL_LOAD_FAILED": S.FAILED_PRECONDITION,
    # Sleep mode (rbee_worker/sleep.py) where the engine cannot sleep: not on
    # CUDA (vLLM has it on CUDA only), or started without RBEE_WORKER_SLEEP_MODE=1.
    "SLEEP_MODE_UNSUPPORTED": S.FAILED_PRECONDITION,
    # A worker asked to sleep while requests run on it.
    "WORKER_BUSY": S.FAILED_PRECONDITION,
    "VERSION_MISMATCH": S.FAILED_PRECONDITION,
    "HIVE_NOT_INSTALLED": S.FAILED_PRECONDITION,
    # Mutual TLS (S13): listening beyond loopback without it, unusable
    # certificate files, no client certificate on this machine.
    "TLS_REQUIRED": S.FAILED_PRECONDITION,
    "TLS_FILE_INVALID": S.FAILED_PRECONDITION,
    "TLS_CLIENT_MISSING": S.FAILED_PRECONDITION,
    "SSH_COMMAND_FAILED": S.FAILED_PRECONDITION,
    # HF_HUB_OFFLINE is set and the model is not in the catalog.
    "HUB_OFFLINE": S.FAILED_PRECONDITION,
    # The hub's file list names a file rbee cannot place inside the model's
    # folder ('..', absolute, backslash, NUL, a link out): the request is fine,
    # the hub's content is not, and no retry changes that.
    "INVALID_HUB_FILE": S.FAILED_PRECONDITION,
    # not built yet: said plainly instead of pretending
    "NOT_IMPLEMENTED": S.UNIMPLEMENTED,
    # internal
    "INTERNAL": S.INTERNAL,
    "WORKER_STARTUP_FAILED": S.INTERNAL,
    "WORKER_OOM_KILLED": S.INTERNAL,
    # vLLM's engine process under a loaded worker died: killed by the kernel's
    # OOM killer (on the kernel's own evidence), or anything else. The worker
    # cannot serve any more, so not RESOURCE_EXHAUSTED: no retry helps there.
    "ENGINE_OOM_KILLED": S.INTERNAL,
    "ENGINE_DIED": S.INTERNAL,
    "WORKER_BUILD_FAILED": S.INTERNAL,
    "BINARY_VERIFICATION_FAILED": S.INTERNAL,
    "DOWNLOAD_FAILED": S.INTERNAL,
    "CHECKSUM_MISMATCH": S.INTERNAL,
    "CATALOG_ERROR": S.INTERNAL,
    "INSTALL_FAILED": S.INTERNAL,
    "HIVE_START_FAILED": S.INTERNAL,
}

# gRPC status code -> code used when a status arrives without our details
# (a proxy, a crashed peer, grpc's own deadline handling).
_FALLBACK: dict[grpc.StatusCode, str] = {
    S.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    S.UNAUTHENTICATED: "INVALID_API_KEY",
    S.PERMISSION_DENIED: "ACCESS_DENIED",
    S.NOT_FOUND: "NOT_FOUND",
    S.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    S.CANCELLED: "CANCELLED",
    # Only a worker's own ErrorInfo says ALL_SLOTS_BUSY (and is retried).
    S.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    S.UNAVAILABLE: "UNAVAILABLE",
}


# grpc's status codes by number (a google.rpc.Status carries the number).
_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


class RbeeError(Exception):
    """A failure with a stable code; what every layer raises and reports."""

    def __init__(
        self,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        suggestions: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, str] = {k: str(v) for k, v in (details or {}).items()}
        self.suggestions: list[str] = list(suggestions)

    @property
    def status_code(self) -> grpc.StatusCode:
        return CODES.get(self.code, S.INTERNAL)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"RbeeError({self.code!r}, {self.message!r}, {self.details!r})"

    def to_status_proto(self) -> status_pb2.Status:
        """The google.rpc.Status that carries this error (cut to fit in trailers)."""
        return self._bound()[1]

    def to_status(self) -> grpc.Status:
        """The gRPC status (with google.rpc details) that carries this error."""
        return rpc_status.to_status(self.to_status_proto())

    def _bound(self) -> tuple["RbeeError", status_pb2.Status]:
        """This error cut to what fits in a status (itself when it fits), and that status."""
        parts = error_wire.Parts(self.code, self.message, self.details, self.suggestions)
        cut, status = error_wire.bound(parts, self.status_code.value[0], self.status_code == S.INVALID_ARGUMENT)
        return (self if cut is parts else RbeeError(*cut)), status

    def _bounded(self) -> "RbeeError":
        return self._bound()[0]


# What gRPC says when TLS itself failed (a certificate of another CA, none, or clear text against TLS).
_TLS_FAILURES = ("handshake", "CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "ssl_transport_security")


# grpc's own wording when a message passes a size limit, on either side
# ("SERVER: Received message larger than max (62914565 vs. 4194304)").
_TOO_LARGE = re.compile(r"(Received|Sent) message larger than max \((\d+) vs\. (\d+)\)")


def _too_large(message: str, details: dict[str, str], target: str) -> RbeeError | None:
    found = _TOO_LARGE.search(message)
    if found is None:
        return None
    direction, size, limit = found.group(1), int(found.group(2)), int(found.group(3))
    who = target or "the daemon"
    if direction == "Sent":
        text = f"The request is {size} bytes; this client sends at most {limit} bytes in one message"
    elif message.startswith("SERVER:") or target:
        text = f"The request is {size} bytes; {who} accepts at most {limit} bytes in one message"
    else:
        text = f"A reply of {size} bytes passed this client's limit of {limit} bytes in one message"
    return RbeeError(
        "MESSAGE_TOO_LARGE",
        text,
        # No grpc_status: a named answer, not a bare status of unknown cause
        # (which the keeper takes for a broken stream).
        {**{k: v for k, v in details.items() if k != "grpc_status"}, "size_bytes": size, "limit_bytes": limit},
        ["Send less in one request: the bound of each field is in docs/inference-api.md"],
    )


def from_rpc_error(err: grpc.RpcError, target: str = "") -> RbeeError:
    """Turn a failed call back into an RbeeError (the client side of the map)."""
    code_fn = getattr(err, "code", None)
    status_code = code_fn() if callable(code_fn) else S.UNKNOWN
    message = (err.details() if callable(getattr(err, "details", None)) else None) or str(status_code)
    try:
        proto = rpc_status.from_call(err)  # type: ignore[arg-type]
    except Exception:  # malformed trailers: fall back to the status code
        proto = None
    if proto is not None and (parts := error_wire.decode(proto)) is not None:
        return RbeeError(*parts)
    return _fallback(status_code, message, target)


def from_status_proto(proto: status_pb2.Status) -> RbeeError:
    """The error a google.rpc.Status carries (one not from a call: the worker's report)."""
    if (parts := error_wire.decode(proto)) is not None:
        return RbeeError(*parts)
    status_code = _BY_NUMBER.get(proto.code, S.UNKNOWN)
    return _fallback(status_code, proto.message or str(status_code), "")


def from_status_bytes(data: bytes) -> RbeeError:
    """The error of a serialized google.rpc.Status (ReportWorkerRequest.error_status)."""
    try:
        proto = status_pb2.Status.FromString(data)
    except DecodeError:
        return RbeeError("INTERNAL", f"An error status of {len(data)} bytes that does not parse")
    return from_status_proto(proto)


def _fallback(status_code: grpc.StatusCode, message: str, target: str) -> RbeeError:
    """A status without rbee's ErrorInfo (a proxy, a crashed peer, grpc itself): named by its status code."""
    code = _FALLBACK.get(status_code, "INTERNAL")
    details = {"grpc_status": status_code.name}
    if target:
        details["target"] = target
    if status_code == S.RESOURCE_EXHAUSTED and (too_large := _too_large(message, details, target)) is not None:
        return too_large
    if status_code == S.UNAVAILABLE and any(m in message for m in _TLS_FAILURES):
        return RbeeError(
            "TLS_HANDSHAKE_FAILED",
            f"The TLS handshake with {target or 'the daemon'} failed: {message}",
            details,
            [
                "Both ends need certificates of the same cluster CA (the queen's $RBEE_HOME/tls/ca.crt)",
                "A daemon started with --insecure speaks clear text: set RBEE_TLS=off for the keeper, or restart it with TLS",
            ],
        )
    if status_code == S.UNAVAILABLE and target:
        return RbeeError(
            "UNAVAILABLE",
            f"Cannot reach {target}: {message}",
            details,
            [f"Check that the daemon at {target} is running and the address is right"],
        )
    return RbeeError(code, message, details)


async def abort(context: grpc.aio.ServicerContext, err: RbeeError) -> None:
    """End the current RPC with ``err`` (raises, like context.abort)."""
    await context.abort_with_status(err.to_status())


_ = code_pb2  # google.rpc.code_pb2 documents the numeric values used above
