"""`rbee-keeper setup enrol-token` (on the queen's machine) and `rbee-keeper
setup join QUEEN --token TOKEN` (on another machine): a keeper gets its client
certificate of the cluster CA without copying files by hand (docs/security.md).

Join checks the queen before it sends anything secret: it takes the
certificate the queen's enrolment port (its port + 1) presents (not trusted yet), asks that
server for the cluster CA over TLS pinned to exactly that certificate, and
goes on only when the CA's SHA-256 is the token's and the queen's certificate
is the CA's, for the queen's identity name. Then, over TLS checked against
that CA, it sends the token's secret and a public key it made; the private
key never leaves this machine. ca.crt, client.crt and client.key are stored
0600 in $RBEE_HOME/tls.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import grpc
import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rbee.errors import RbeeError, from_rpc_error
from rbee.tls import CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, TLS_DIR, ClusterCA, _write_private, key_pem, san_hosts
from rbee.tls_identity import QUEEN_NAME
from rbee.v1 import enrol_pb2, enrol_pb2_grpc

from rbee_keeper.commands.setup import setup_app
from rbee_keeper.common import run
from rbee_keeper.render import narrator

CALL_TIMEOUT_S = 15.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RbeeError("USAGE_ERROR", f"QUEEN must be HOST:PORT, not {address!r}", {"queen": address},
                        ["For example: rbee-keeper setup join 192.0.2.10:7800 --token TOKEN"])  # fmt: skip
    return host.strip("[]"), int(port)


def presented_certificate(host: str, port: int, timeout: float = CALL_TIMEOUT_S) -> bytes:
    """The certificate the TLS server at host:port presents (PEM), unchecked."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=QUEEN_NAME) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise RbeeError("UNAVAILABLE", f"Cannot reach a TLS server at {host}:{port}: {exc}", {"queen": f"{host}:{port}"},
                        ["Check the queen's address; it serves TLS when started with --host beyond loopback"]) from None  # fmt: skip
    if not der:
        raise RbeeError("UNAVAILABLE", f"The server at {host}:{port} presented no certificate", {"queen": f"{host}:{port}"})
    return ssl.DER_cert_to_PEM_cert(der).encode()


def check_queen(presented: bytes, ca_pem: bytes, fingerprint: bytes, address: str) -> None:
    """ENROL_CA_MISMATCH unless ``ca_pem`` is the token's CA and ``presented``
    is its certificate for the queen's identity name."""
    from rbee_queen.enrol import ca_fingerprint

    mismatch = RbeeError(
        "ENROL_CA_MISMATCH",
        f"The server at {address} is not the queen of this token's cluster: nothing secret was sent",
        {"queen": address},
        ["Check the address (the queen's, as seen from this machine) and that the token was made by that queen"],
    )
    try:
        if ca_fingerprint(ca_pem) != fingerprint:
            raise mismatch
        ca = x509.load_pem_x509_certificate(ca_pem)
        leaf = x509.load_pem_x509_certificates(presented)[0]
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise mismatch from None
    if QUEEN_NAME not in san_hosts(leaf):
        raise mismatch


async def join(address: str, token: str, name: str) -> tuple[bytes, bytes, bytes]:
    """(ca.crt, client.crt, client.key) for this keeper from the queen at ``address``."""
    from rbee_queen.enrol import enrol_port, parse_token

    fingerprint, secret = parse_token(token)
    host, queen_port = _split(address)
    # Enrolment has its own port beside the queen's (rbee_queen/enrol.py).
    port = enrol_port(queen_port)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    presented = await asyncio.to_thread(presented_certificate, host, port)
    options = (("grpc.ssl_target_name_override", QUEEN_NAME),)
    # 1. The CA, from exactly the server whose certificate was presented.
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=presented), options=options) as ch:
        try:
            reply = await enrol_pb2_grpc.EnrolServiceStub(ch).GetClusterCA(enrol_pb2.GetClusterCARequest(), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            raise from_rpc_error(err, address) from None
    check_queen(presented, reply.ca_pem, fingerprint, address)
    # 2. The secret, only to a queen of that CA.
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    request = enrol_pb2.JoinRequest(secret=secret, public_key_pem=public, name=name)
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=reply.ca_pem), options=options) as ch:
        try:
            joined = await enrol_pb2_grpc.EnrolServiceStub(ch).Join(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            raise from_rpc_error(err, address) from None
    return reply.ca_pem, joined.certificate_pem, key_pem(key)


def _machine_name() -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].lstrip("._-") or "keeper"


@setup_app.command("join")
def join_cmd(
    queen: str = typer.Argument(..., metavar="QUEEN", help="The queen's HOST:PORT, as this machine reaches it."),
    token: str = typer.Option(..., "--token", metavar="TOKEN", help="A one-time token from `rbee-keeper setup enrol-token` on the queen's machine."),
    force: bool = typer.Option(False, "--force", help="Replace a client certificate this machine has already."),
) -> None:
    """Join the cluster from another machine: get this keeper's client certificate
    of the cluster CA (stored 0600 in $RBEE_HOME/tls).

    Example: rbee-keeper setup join 192.0.2.10:7800 --token rbee1.AbC...
    """
    from rbee.config import rbee_home

    async def go() -> int:
        folder = rbee_home() / TLS_DIR
        if (folder / CA_KEY).exists():
            raise RbeeError("USAGE_ERROR", f"This machine holds the cluster CA ({folder}): its keeper needs no enrolment",
                            {"folder": str(folder)}, ["Run `rbee-keeper setup join QUEEN_HOST:PORT --token TOKEN` on the other machine"])  # fmt: skip
        if (folder / CLIENT_CERT).exists() and not force:
            raise RbeeError("USAGE_ERROR", f"This machine has a client certificate already ({folder / CLIENT_CERT})",
                            {"folder": str(folder)}, ["Pass --force to replace it"])  # fmt: skip
        say = narrator()
        ca, cert, key = await join(queen, token, _machine_name())
        for file, data in ((CLIENT_KEY, key), (CLIENT_CERT, cert), (CA_CERT, ca)):
            _write_private(folder / file, data)
        say("🔐", f"Joined the cluster of the queen at {queen}: {CA_CERT}, {CLIENT_CERT} and {CLIENT_KEY} written to {folder} (0600)")
        return 0

    run(go())


@setup_app.command("enrol-token")
def enrol_token_cmd(
    ttl: str = typer.Option("1h", "--ttl", metavar="DURATION", help="How long the token may wait to be used (1m to 168h)."),
) -> None:
    """Print a one-time token for a keeper on another machine to join the cluster (run it on the queen's machine).

    On the other machine: rbee-keeper setup join QUEEN_HOST:PORT --token TOKEN

    Example: rbee-keeper setup enrol-token --ttl 15m
    """
    from datetime import timedelta

    from rbee.config import rbee_home
    from rbee.settings import parse_duration
    from rbee_queen.enrol import EnrolTokens

    async def go() -> int:
        folder = rbee_home() / TLS_DIR
        if not (folder / CA_KEY).exists():
            raise RbeeError("USAGE_ERROR", f"No cluster CA here ({folder}): enrolment tokens are made on the queen's machine",
                            {"folder": str(folder)}, ["Run `rbee-keeper setup enrol-token` where queen-rbee runs (same RBEE_HOME)"])  # fmt: skip
        duration = parse_duration(ttl)
        if not isinstance(duration, timedelta):
            raise RbeeError("USAGE_ERROR", f"--ttl must be a duration like 15m or 2h, not {ttl!r}", {"ttl": ttl},
                            ["Pass --ttl 15m"])  # fmt: skip
        token = EnrolTokens(ClusterCA(rbee_home())).create(int(duration.total_seconds()))
        narrator()("🎟️", f"One-time enrolment token, valid {ttl}: on the other machine run "
                   "`rbee-keeper setup join QUEEN_HOST:PORT --token TOKEN`")  # fmt: skip
        print(token, flush=True)
        return 0

    run(go())
