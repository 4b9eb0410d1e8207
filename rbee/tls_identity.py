"""Which daemon a certificate belongs to, whatever its address (S13).

Address names prove little in rbee's cluster: a node's issuing certificate can
be limited to DNS names (the TLS library under gRPC refuses address
constraints), so any node could sign a certificate for any IP address. So each
certificate the cluster CA issues also carries an identity name under the
reserved ``.invalid`` domain (never a real host), and every client that knows
whom it means to reach checks that name instead of the address:

- the queen: ``queen.rbee.invalid`` (only the cluster CA issues it);
- a node's hive: ``<name>-<digest>.node.rbee.invalid``, where the digest covers
  the node's name and its registration, so a node removed and added again
  gets a new identity and the old certificates pass for nothing the queen
  asks for;
- a worker: ``<worker id>.<its hive's identity>``, signed by the hive's issuing
  certificate, whose name constraint permits its own node's names only.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509

DOMAIN = "rbee.invalid"
NODE_DOMAIN = f"node.{DOMAIN}"
QUEEN_NAME = f"queen.{DOMAIN}"
_LABEL = re.compile(r"[^a-z0-9-]+")


def node_identity(name: str, registered: int | str = "") -> str:
    """The identity name of node ``name``'s hive for one registration."""
    digest = hashlib.sha256(f"{name}\n{registered}".encode()).hexdigest()[:16]
    slug = _LABEL.sub("-", name.lower()).strip("-")[:40] or "node"
    return f"{slug}-{digest}.{NODE_DOMAIN}"


def worker_identity(hive_identity: str, worker_id: str) -> str:
    return f"{_LABEL.sub('-', worker_id.lower()).strip('-')[:63]}.{hive_identity}"


def identity_of(cert: x509.Certificate | None) -> str | None:
    """The node identity a (hive's) certificate carries, if any."""
    if cert is None:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san.get_values_for_type(x509.DNSName):
        if name.endswith("." + NODE_DOMAIN) and name.count(".") == NODE_DOMAIN.count(".") + 1:
            return name
    return None


def hive_identity_of(worker_cert: x509.Certificate | None) -> str | None:
    """The identity of the hive that issued a worker's certificate (the parent
    of the worker's own name), or None when it carries none."""
    if worker_cert is None:
        return None
    try:
        san = worker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san.get_values_for_type(x509.DNSName):
        if name.endswith("." + NODE_DOMAIN) and name.count(".") == NODE_DOMAIN.count(".") + 2:
            return name.partition(".")[2]
    return None
