"""Enrolment of a keeper on another machine (docs/security.md).

``rbee-keeper setup enrol-token`` on the queen's machine writes a one-time
token: ``rbee1.<CA fingerprint>.<secret>`` (SHA-256 of the cluster CA's
certificate, 32 random bytes; both base64url). Only the secret's digest and
its expiry are kept (``$RBEE_HOME/tls/enrol-tokens.json``, 0600).

``rbee-keeper setup join QUEEN --token TOKEN`` on the other machine checks the
queen against the fingerprint before it sends the secret, then sends its
public key; the queen signs a client certificate for it, once per token.

Enrolment has a port of its own beside a TLS queen (the queen's port + 1,
``start_enrolment``): TLS with the queen's certificate, no client certificate
asked (a joining keeper has none yet), EnrolService alone. The queen's own
port keeps requiring a client certificate of the cluster CA.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rbee.errors import RbeeError, abort
from rbee.channel import SERVER_OPTIONS
from rbee.rpc import RequestGuard
from rbee.tls import ClusterCA, TlsIdentity, _write_private
from rbee.v1 import enrol_pb2, enrol_pb2_grpc

TOKENS_FILE = "enrol-tokens.json"
TOKEN_PREFIX = "rbee1"
DEFAULT_TTL_S = 3600
MAX_TTL_S = 7 * 24 * 3600
MAX_TOKENS = 100
MAX_PUBLIC_KEY = 1024
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ca_fingerprint(ca_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def parse_token(token: str) -> tuple[bytes, str]:
    """(CA fingerprint, secret) of a token; ENROL_TOKEN_INVALID otherwise."""
    parts = token.strip().split(".")
    try:
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise ValueError
        fingerprint, secret = _unb64(parts[1]), parts[2]
        if len(fingerprint) != 32 or len(_unb64(secret)) != 32:
            raise ValueError
    except ValueError:
        raise RbeeError(
            "ENROL_TOKEN_INVALID",
            "This is not an enrolment token (rbee1.<fingerprint>.<secret>)",
            suggestions=["Copy the whole token `rbee-keeper setup enrol-token` printed on the queen's machine"],
        ) from None
    return fingerprint, secret


class EnrolTokens:
    """One-time tokens of the queen's home, by the digest of their secret."""

    def __init__(self, ca: ClusterCA) -> None:
        self.ca = ca
        self.path = Path(ca.dir) / TOKENS_FILE

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        now = time.time()
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and v > now}

    def _save(self, tokens: dict[str, float]) -> None:
        _write_private(self.path, json.dumps(tokens).encode())

    def create(self, ttl_s: int = DEFAULT_TTL_S) -> str:
        if not 60 <= ttl_s <= MAX_TTL_S:
            raise RbeeError("INVALID_ARGUMENT", f"A token lasts 60 s to {MAX_TTL_S // 3600} h, not {ttl_s} s",
                            {"ttl_s": str(ttl_s)}, ["Pass --ttl between 1m and 168h"])  # fmt: skip
        fingerprint = ca_fingerprint(self.ca.ca_pem())
        secret = _b64(secrets.token_bytes(32))
        with self.ca._locked():  # noqa: SLF001 - one lock for everything in the CA's folder
            tokens = self._load()
            if len(tokens) >= MAX_TOKENS:
                raise RbeeError("INVALID_ARGUMENT", f"{MAX_TOKENS} enrolment tokens are waiting to be used already",
                                suggestions=["Use them, or wait until they expire"])  # fmt: skip
            tokens[hashlib.sha256(secret.encode()).hexdigest()] = time.time() + ttl_s
            self._save(tokens)
        return f"{TOKEN_PREFIX}.{_b64(fingerprint)}.{secret}"

    def consume(self, secret: str) -> bool:
        """Whether ``secret`` is a waiting token's; it is used up either way."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        with self.ca._locked():  # noqa: SLF001
            tokens = self._load()
            found = tokens.pop(digest, None) is not None
            if found:  # a wrong secret (anyone can send one) costs no write
                self._save(tokens)
        return found


class EnrolServicer(enrol_pb2_grpc.EnrolServiceServicer):
    def __init__(self, ca: ClusterCA, narrate: Callable[..., Any]) -> None:
        self.ca = ca
        self.tokens = EnrolTokens(ca)
        self.narrate = narrate

    async def GetClusterCA(self, request: enrol_pb2.GetClusterCARequest, context: grpc.aio.ServicerContext) -> enrol_pb2.GetClusterCAResponse:
        return enrol_pb2.GetClusterCAResponse(ca_pem=self.ca.ca_pem())

    async def Join(self, request: enrol_pb2.JoinRequest, context: grpc.aio.ServicerContext) -> enrol_pb2.JoinResponse:
        if not NAME.fullmatch(request.name):  # match() let a trailing newline through into the log and the certificate
            await abort(context, RbeeError("INVALID_ARGUMENT", "The keeper's name must be 1-64 letters, digits, '.', '_' or '-'",
                                           {"field": "name"}))  # fmt: skip
        key = None
        if len(request.public_key_pem) <= MAX_PUBLIC_KEY:
            try:
                key = serialization.load_pem_public_key(request.public_key_pem)
            except (ValueError, TypeError):
                key = None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            await abort(context, RbeeError("INVALID_ARGUMENT", "The keeper's public key must be a PEM P-256 key",
                                           {"field": "public_key_pem"}))  # fmt: skip
        if not self.tokens.consume(request.secret):
            self.narrate("⛔", f"Refused an enrolment of {request.name} from {context.peer()}: unknown, used or expired token", "warn")
            await abort(context, RbeeError(
                "ENROL_TOKEN_INVALID", "This enrolment token is unknown, used already or expired",
                suggestions=["Make a new one on the queen's machine: `rbee-keeper setup enrol-token`"],
            ))  # fmt: skip
        chain = self.ca.issuer().sign_leaf(f"rbee keeper {request.name}", key, [])
        self.narrate("🔐", f"Enrolled keeper {request.name} ({context.peer()}): client certificate issued")
        return enrol_pb2.JoinResponse(certificate_pem=chain, ca_pem=self.ca.ca_pem())


ENROL_PORT_OFFSET = 1


def enrol_port(queen_port: int) -> int:
    return queen_port + ENROL_PORT_OFFSET


async def start_enrolment(host: str, queen_port: int, tls: TlsIdentity, ca: ClusterCA, narrate: Callable[..., Any]) -> grpc.aio.Server | None:
    """A server of its own for enrolment beside a TLS queen, on the queen's
    port + 1: TLS with the queen's certificate that asks no client certificate
    (a joining keeper has none yet) and serves EnrolService alone, so the
    queen's own port keeps requiring one. None (said as a warning) when that
    port is taken."""
    server = grpc.aio.server(interceptors=[RequestGuard()], options=SERVER_OPTIONS)
    enrol_pb2_grpc.add_EnrolServiceServicer_to_server(EnrolServicer(ca, narrate), server)
    port = enrol_port(queen_port)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, dataclasses.replace(tls, client_optional=True).server_credentials())
    except RuntimeError:
        bound = 0
    if not bound:
        narrate("⚠️", f"Enrolment is off: port {port} is in use (keepers elsewhere cannot join: `rbee-keeper setup join HOST:PORT --token TOKEN` would not reach it)", "warn")
        return None
    await server.start()
    narrate("🎟️", f"Enrolment on port {port}: a keeper elsewhere joins with `rbee-keeper setup join HOST:{queen_port} --token TOKEN`")
    return server
