"""Whether an address stays on this machine: decided before a client knows if
it needs TLS at all, so it lives apart from rbee/tls.py (which imports the
cryptography package that a plain loopback call never needs)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, brackets allowed) stays on this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
