"""Mutual TLS (S13): the cluster CA and what it issues, checked with the
cryptography package's own verifier and through real gRPC handshakes on
127.0.0.1 (a server that asks for client certificates, clients with the
right certificate, none, another CA's, or no TLS at all)."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from rbee.channel import bind_port
from rbee.errors import RbeeError
from tests.fixtures.common import health_status
from rbee.tls import (
    CA_KEY,
    ISSUER_CERT,
    ISSUER_KEY,
    HIVE_CERT,
    HIVE_KEY,
    ClusterCA,
    Issuer,
    TlsIdentity,
    is_loopback,
    san_hosts,
)




def _verify(chain_pem: bytes, root_pem: bytes, host: str) -> list[x509.Certificate]:
    certs = x509.load_pem_x509_certificates(chain_pem)
    store = Store(x509.load_pem_x509_certificates(root_pem))
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = PolicyBuilder().store(store).build_server_verifier(subject)
    return verifier.verify(certs[0], certs[1:])


def test_the_cluster_ca_is_created_once_owner_only(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path)
    first = ca.ca_pem()
    assert stat.S_IMODE(os.stat(tmp_path / "tls").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / CA_KEY).st_mode) == 0o600
    # A second queen on the same home reads the same CA instead of making another.
    assert ClusterCA(tmp_path).ca_pem() == first
    ident = ca.client_identity()
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / "client.key").st_mode) == 0o600
    _verify(ident.cert, first, "127.0.0.1")


def test_a_node_bundle_chains_hive_and_worker_certificates_to_the_cluster_ca(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path)
    bundle = ca.node_bundle("box", ["192.0.2.10", "box.example"])
    assert bundle[HIVE_KEY][1] == 0o600 and bundle[ISSUER_KEY][1] == 0o600
    hive_chain = bundle[HIVE_CERT][0]
    for host in ("192.0.2.10", "box.example", "127.0.0.1", "localhost"):
        _verify(hive_chain, ca.ca_pem(), host)
    with pytest.raises(Exception):
        _verify(hive_chain, ca.ca_pem(), "198.51.100.7")  # a name it was not issued for
    # The hive signs a worker's certificate with its issuing certificate:
    # the chain (worker, issuer) verifies against the cluster CA alone.
    issuer = Issuer.from_pem(bundle[ISSUER_CERT][0], bundle[ISSUER_KEY][0])
    leaf = x509.load_pem_x509_certificates(hive_chain)[0]
    worker = issuer.issue_leaf("llm-worker-rbee w1", san_hosts(leaf))
    path = _verify(worker.chain, ca.ca_pem(), "192.0.2.10")
    assert len(path) == 3
    # ... and only for its node's host names: not for another node's.
    impostor = issuer.issue_leaf("not box", ["other.example"])
    with pytest.raises(Exception):
        _verify(impostor.chain, ca.ca_pem(), "other.example")
    # The issuing certificate may sign leaves only: a CA it signed is refused.
    sub = issuer.issue_issuer("a CA below the hive's")
    sub_issuer = Issuer.from_pem(sub.chain, sub.key)
    deeper = sub_issuer.issue_leaf("too deep", ["127.0.0.1"])
    with pytest.raises(Exception):
        _verify(deeper.chain, ca.ca_pem(), "127.0.0.1")


def test_tls_files_are_checked_and_named(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path)
    issued = ca.issuer().issue_leaf("x", [])
    cert, key, ca_file = tmp_path / "x.crt", tmp_path / "x.key", tmp_path / "ca.crt"
    cert.write_bytes(issued.chain)
    key.write_bytes(issued.key)
    ca_file.write_bytes(ca.ca_pem())
    key.chmod(0o644)
    with pytest.raises(RbeeError) as err:
        TlsIdentity.load(cert, key, ca_file)
    assert err.value.code == "TLS_FILE_INVALID" and "chmod 600" in err.value.suggestions[0]
    key.chmod(0o600)
    assert TlsIdentity.load(cert, key, ca_file).cert == issued.chain
    with pytest.raises(RbeeError) as err:
        TlsIdentity.load(cert, key, tmp_path / "missing.crt")
    assert err.value.code == "TLS_FILE_INVALID" and "missing.crt" in err.value.message
    cert.write_text("not a certificate")
    with pytest.raises(RbeeError) as err:
        TlsIdentity.load(cert, key, ca_file)
    assert err.value.code == "TLS_FILE_INVALID" and "PEM" in err.value.message
    with pytest.raises(RbeeError) as err:
        TlsIdentity.load(None, key, ca_file)
    assert err.value.code == "TLS_FILE_INVALID"


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("192.0.2.10", False), ("box.example", False), ("", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.asyncio
async def test_a_server_beyond_loopback_without_tls_is_refused() -> None:
    server = grpc.aio.server()
    with pytest.raises(RbeeError) as err:
        bind_port(server, "0.0.0.0:0", "rbee-hive")
    assert err.value.code == "TLS_REQUIRED"
    assert any("--insecure" in s for s in err.value.suggestions)
    assert bind_port(server, "0.0.0.0:0", "rbee-hive", insecure=True) > 0




@pytest.mark.asyncio
async def test_mutual_tls_admits_only_clients_of_the_cluster_ca(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path / "queen")
    bundle = ca.node_bundle("box", ["127.0.0.1"])
    issuer = Issuer.from_pem(bundle[ISSUER_CERT][0], bundle[ISSUER_KEY][0])
    worker = issuer.issue_leaf("llm-worker-rbee w1", ["127.0.0.1"])
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # A worker's certificate (two levels below the root) serves, with its chain.
    port = bind_port(server, "127.0.0.1:0", "llm-worker-rbee", TlsIdentity(ca.ca_pem(), worker.chain, worker.key))
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        assert await health_status(address, ca.client_identity()) == "SERVING"
        # The hive's own certificate is a client certificate too (its calls to its workers).
        assert await health_status(address, TlsIdentity(ca.ca_pem(), bundle[HIVE_CERT][0], bundle[HIVE_KEY][0])) == "SERVING"
        assert await health_status(address, TlsIdentity(ca.ca_pem())) == "refused: UNAVAILABLE"  # no client certificate
        stranger = ClusterCA(tmp_path / "other").client_identity()
        assert await health_status(address, stranger) == "refused: UNAVAILABLE"  # another CA's
        assert await health_status(address, None) == "refused: UNAVAILABLE"  # clear text
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_a_client_checks_the_servers_name(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path)
    # A certificate for another machine, served here: 127.0.0.1 is not in it.
    other = ca.issuer()._builder  # noqa: SLF001 - building a certificate without loopback names
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from rbee.tls import cert_pem, key_pem

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        other("elsewhere", key.public_key(), 30)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("elsewhere.example")]), critical=False)
        .sign(ca.issuer().key, hashes.SHA256())
    )
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = bind_port(server, "127.0.0.1:0", "x", TlsIdentity(ca.ca_pem(), cert_pem(cert), key_pem(key)))
    await server.start()
    try:
        assert await health_status(f"127.0.0.1:{port}", ca.client_identity()) == "refused: UNAVAILABLE"
    finally:
        await server.stop(None)


def test_keeper_tls_follows_what_it_is_told_and_the_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rbee_keeper.daemon_client import keeper_tls

    monkeypatch.setenv("RBEE_HOME", str(tmp_path / "home"))
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.delenv("RBEE_TLS", raising=False)
    assert keeper_tls("127.0.0.1:7900") is None
    assert keeper_tls("192.0.2.10:7900", served=False) is None
    # Beyond loopback, with no certificate on this machine: named, with what to copy.
    with pytest.raises(RbeeError) as err:
        keeper_tls("192.0.2.10:7900")
    assert err.value.code == "TLS_CLIENT_MISSING" and "setup join" in err.value.suggestions[0]
    assert "client.crt" in err.value.suggestions[1]
    # On the queen's machine the CA is there: the keeper gets the client certificate.
    ClusterCA(tmp_path / "home").ca_pem()
    ident = keeper_tls("192.0.2.10:7900")
    assert ident is not None and ident.cert
    assert keeper_tls("127.0.0.1:7900", served=True) is not None
    monkeypatch.setenv("RBEE_TLS", "off")
    assert keeper_tls("192.0.2.10:7900") is None
    monkeypatch.setenv("RBEE_TLS", "on")
    assert keeper_tls("127.0.0.1:7900") is not None
