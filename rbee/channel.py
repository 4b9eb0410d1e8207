"""Client channels to rbee daemons."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from rbee.auth import auth_metadata
from rbee.bounds import DAEMON_RECEIVE_LIMIT

if TYPE_CHECKING:
    from collections.abc import Callable

    from rbee.errors import RbeeError
    from rbee.tls import TlsIdentity

# Streams can be long and quiet (loading, stalls are detected by the clients).
# A ping every 2 s answered within 3 s: a link that drops silently mid-stream
# (a cable, a black-holing firewall) is noticed within 5 s (docs/behaviour.md S9),
# long before the 60 s stall timeout.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    # gRPC waits this long for any ping's answer (60 s by default, whatever
    # the keepalive timeout says, when another ping is in flight).
    ("grpc.http2.ping_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A daemon that is starting (a hive the queen just launched) is tried
    # again at least every second: gRPC's own backoff grows to 2 minutes, and
    # a hive that starts listening after 45 s was not asked again before 70 s.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Keep pinging through long quiet stretches (a model loading, a stall).
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

# Every rbee daemon accepts the clients' keepalive pings: gRPC's server
# defaults (one ping per 5 min, none without a call) would answer a client
# pinging every 2 s through a quiet stream with GOAWAY "too_many_pings",
# ending every call on that connection.
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    # Without this gRPC binds with SO_REUSEPORT, and a second daemon on the
    # same port would silently share it instead of failing.
    ("grpc.so_reuseport", 0),
    # grpc refuses a larger message from its length prefix, before reading
    # it (RESOURCE_EXHAUSTED, which clients name MESSAGE_TOO_LARGE): the
    # queen's and the hive's requests are a few KB. A worker's limit follows
    # from its context (server_options, rbee/bounds.py).
    ("grpc.max_receive_message_length", DAEMON_RECEIVE_LIMIT),
)


def server_options(receive_limit: int = DAEMON_RECEIVE_LIMIT) -> tuple[tuple[str, int], ...]:
    """SERVER_OPTIONS with another receive limit (bytes in one message)."""
    kept = tuple(o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length")
    return (*kept, ("grpc.max_receive_message_length", receive_limit))


def open_channel(address: str, tls: "TlsIdentity | None" = None, options: tuple = ()) -> grpc.aio.Channel:
    """An aio channel to host:port: mutual TLS against the cluster CA when
    ``tls`` is given (every link that leaves loopback, S13), else plain. With
    ``tls.peer`` the server must prove that identity name, not the address."""
    if tls is not None:
        if tls.peer:
            # The server's certificate must carry this identity name
            # (rbee/tls_identity.py): an address proves nothing, any node's
            # issuing certificate could name it.
            options = (*options, ("grpc.ssl_target_name_override", tls.peer))
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=(*CHANNEL_OPTIONS, *options))
    return grpc.aio.insecure_channel(address, options=(*CHANNEL_OPTIONS, *options))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return auth_metadata(api_key)


def tls_required(program: str, address: str, flags: str) -> "RbeeError":
    from rbee.errors import RbeeError

    return RbeeError(
        "TLS_REQUIRED",
        f"{program} will not listen on {address} without TLS: keys and tokens would cross the network in clear",
        {"address": address},
        [
            f"Give it a certificate ({flags}); a node the queen registers gets one from its CA",
            "Or listen on loopback only (--host 127.0.0.1)",
            "Or pass --insecure to accept clear-text links on a network you trust",
        ],
    )


def bind_port(
    server: grpc.aio.Server,
    address: str,
    program: str,
    tls: "TlsIdentity | None" = None,
    insecure: bool = False,
    tls_flags: str = "--tls-cert, --tls-key and --tls-ca",
    in_use: "Callable[[], RbeeError] | None" = None,
) -> int:
    """Bind ``server`` to host:port; PORT_IN_USE naming the program when taken
    (or ``in_use()``, a program's own wording of it). With ``tls`` the port
    speaks mutual TLS; without it an address beyond loopback is refused
    (TLS_REQUIRED) unless ``insecure``."""
    from rbee.errors import RbeeError
    from rbee.tls import is_loopback

    host = address.rpartition(":")[0]
    if tls is None and not insecure and not is_loopback(host):
        raise tls_required(program, address, tls_flags)
    try:
        port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        if in_use is not None:
            raise in_use()
        raise RbeeError(
            "PORT_IN_USE",
            f"{program} cannot listen on {address}: the port is in use (or the address is not one of this machine's)",
            {"address": address},
            [f"Stop whatever listens on {address} (another {program}?) or pass --port; --host must be an address of this machine"],
        )
    return port
