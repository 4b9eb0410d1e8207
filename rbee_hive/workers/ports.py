"""Worker ports: taken from a range, skipping ports that are in use."""

from __future__ import annotations

import socket
from collections.abc import Iterator

from rbee.errors import RbeeError


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a bind would succeed).
    Another process may still take it before the worker binds: the worker
    then exits with PORT_IN_USE and the next port is tried."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option grpc sets, so TIME_WAIT leftovers do not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports of [start, end]; a port stays reserved (for spawns in
    flight and running workers) until released."""

    def __init__(self, host: str, start: int, end: int) -> None:
        self.host = host
        self.start = start
        self.end = end
        self._reserved: set[int] = set()

    def candidates(self) -> Iterator[int]:
        for port in range(self.start, self.end + 1):
            if port not in self._reserved:
                yield port

    def reserve(self, port: int) -> None:
        self._reserved.add(port)

    def release(self, port: int) -> None:
        self._reserved.discard(port)

    def exhausted(self, tried: list[int]) -> RbeeError:
        return RbeeError(
            "NO_FREE_PORT",
            f"No free worker port in {self.start}-{self.end} on {self.host}",
            {"range": f"{self.start}-{self.end}", "tried": ", ".join(map(str, tried[-10:])), "reserved": len(self._reserved)},
            [
                "Stop workers you no longer need (rbee-keeper workers shutdown --id ID)",
                "Or widen the range: RBEE_HIVE_WORKER_PORT_START / RBEE_HIVE_WORKER_PORT_END",
            ],
        )
