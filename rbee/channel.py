"""Client channels to rbee daemons."""

from __future__ import annotations

import grpc

from rbee.auth import auth_metadata

# Streams can be long and quiet (loading, stalls are detected by the clients).
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Keep pinging through long quiet stretches (a model loading, a stall).
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

# Every rbee daemon accepts the clients' keepalive pings: gRPC's server
# defaults (one ping per 5 min, none without a call) would answer a client
# pinging every 10 s through a quiet stream with GOAWAY "too_many_pings",
# ending every call on that connection.
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    # Without this gRPC binds with SO_REUSEPORT, and a second daemon on the
    # same port would silently share it instead of failing.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure aio channel to host:port (loopback/LAN; keys guard the RPCs)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return auth_metadata(api_key)


def bind_port(server: grpc.aio.Server, address: str, program: str) -> int:
    """Bind ``server`` to host:port; PORT_IN_USE naming the program when taken."""
    from rbee.errors import RbeeError

    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise RbeeError(
            "PORT_IN_USE",
            f"{program} cannot listen on {address}: the port is in use (or the address is not one of this machine's)",
            {"address": address},
            [f"Stop whatever listens on {address} (another {program}?) or pass --port; --host must be an address of this machine"],
        )
    return port
