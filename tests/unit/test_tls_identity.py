"""A certificate proves which daemon it belongs to, whatever the address
(docs/security.md): real gRPC handshakes over TLS on 127.0.0.1, where node
A's issuing certificate signs a certificate for the address (or the name) of
another node or of the queen."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from rbee.channel import bind_port
from rbee.tls import HIVE_CERT, HIVE_KEY, ISSUER_CERT, ISSUER_KEY, NODE_DAYS, ClusterCA, Issuer, TlsIdentity
from rbee.tls_identity import QUEEN_NAME, identity_of, node_identity, worker_identity
from tests.fixtures.common import health_status


async def _serve(identity: TlsIdentity) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = bind_port(server, "127.0.0.1:0", "rbee-hive", identity)
    await server.start()
    return server, f"127.0.0.1:{port}"


def _nodes(tmp_path: Path) -> tuple[ClusterCA, dict, dict, str, str]:
    ca = ClusterCA(tmp_path / "queen")
    a_name, b_name = node_identity("a", 1), node_identity("b", 2)
    # Both nodes registered by address: the way nodes usually are.
    return ca, ca.node_bundle("a", ["127.0.0.1"], a_name), ca.node_bundle("b", ["127.0.0.1"], b_name), a_name, b_name


@pytest.mark.asyncio
async def test_a_node_cannot_pass_for_another_node_or_the_queen_by_address(tmp_path: Path) -> None:
    ca, a, b, a_name, b_name = _nodes(tmp_path)
    client = ca.client_identity()
    a_issuer = Issuer.from_pem(a[ISSUER_CERT][0], a[ISSUER_KEY][0])
    # Node A's issuing certificate signs a certificate for B's (and the queen's) address.
    forged = a_issuer.issue_leaf("rbee-hive b", ["127.0.0.1"])
    server, address = await _serve(TlsIdentity(ca.ca_pem(), forged.chain, forged.key))
    try:
        # What an address check alone admits (what a client dialling by address gets):
        assert await health_status(address, client) == "SERVING"
        # A client that means to reach node B, or the queen, refuses it.
        assert await health_status(address, client.for_peer(b_name)) == "refused: UNAVAILABLE"
        assert await health_status(address, client.for_peer(QUEEN_NAME)) == "refused: UNAVAILABLE"
    finally:
        await server.stop(None)
    # Nor can A's issuer sign for B's identity name: its name constraint forbids it.
    named = a_issuer.issue_leaf("rbee-hive b", ["127.0.0.1", b_name, QUEEN_NAME])
    server, address = await _serve(TlsIdentity(ca.ca_pem(), named.chain, named.key))
    try:
        assert await health_status(address, client.for_peer(b_name)) == "refused: UNAVAILABLE"
        assert await health_status(address, client.for_peer(QUEEN_NAME)) == "refused: UNAVAILABLE"
    finally:
        await server.stop(None)
    # B's own hive certificate passes for B, and not for A.
    server, address = await _serve(TlsIdentity(ca.ca_pem(), b[HIVE_CERT][0], b[HIVE_KEY][0]))
    try:
        assert await health_status(address, client.for_peer(b_name)) == "SERVING"
        assert await health_status(address, client.for_peer(a_name)) == "refused: UNAVAILABLE"
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_a_worker_proves_its_own_identity_below_its_node(tmp_path: Path) -> None:
    ca, a, b, a_name, b_name = _nodes(tmp_path)
    client = ca.client_identity()
    a_issuer = Issuer.from_pem(a[ISSUER_CERT][0], a[ISSUER_KEY][0])
    own = worker_identity(a_name, "worker-1")
    worker = a_issuer.issue_leaf("llm-worker-rbee worker-1", ["127.0.0.1", own])
    server, address = await _serve(TlsIdentity(ca.ca_pem(), worker.chain, worker.key))
    try:
        assert await health_status(address, client.for_peer(own)) == "SERVING"
        # Not a worker of node B, nor node A's hive, nor another worker of A.
        assert await health_status(address, client.for_peer(worker_identity(b_name, "worker-1"))) == "refused: UNAVAILABLE"
        assert await health_status(address, client.for_peer(a_name)) == "refused: UNAVAILABLE"
        assert await health_status(address, client.for_peer(worker_identity(a_name, "worker-2"))) == "refused: UNAVAILABLE"
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_the_queens_certificate_proves_the_queen(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path / "queen")
    server, address = await _serve(ca.server_identity("queen-rbee", ["192.0.2.1"]))
    try:
        assert await health_status(address, ca.client_identity().for_peer(QUEEN_NAME)) == "SERVING"
        assert await health_status(address, ca.client_identity().for_peer(node_identity("a", 1))) == "refused: UNAVAILABLE"
    finally:
        await server.stop(None)


def test_identities_are_per_registration_and_node_certificates_are_short(tmp_path: Path) -> None:
    # Removing a node and adding it again gives it a new identity: the old
    # certificates (still on the removed machine) pass for nothing asked.
    assert node_identity("a", 1) != node_identity("a", 2) != node_identity("A", 2)
    assert node_identity("Box_1.lan", 5).endswith(".node.rbee.invalid")
    ca = ClusterCA(tmp_path)
    bundle = ca.node_bundle("a", ["10.0.0.5"], node_identity("a", 1))
    from cryptography import x509

    for name in (HIVE_CERT, ISSUER_CERT):
        cert = x509.load_pem_x509_certificates(bundle[name][0])[0]
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert life.days <= NODE_DAYS
    assert identity_of(x509.load_pem_x509_certificates(bundle[HIVE_CERT][0])[0]) == node_identity("a", 1)
