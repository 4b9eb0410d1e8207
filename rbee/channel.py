"""Client channels to rbee daemons."""

from __future__ import annotations

import grpc

from rbee.auth import auth_metadata

# Streams can be long and quiet (loading, stalls are detected by the clients).
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure aio channel to host:port (loopback/LAN; keys guard the RPCs)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return auth_metadata(api_key)
