"""The front door's server: which certificate it serves where, a taken port,
and HTTPS with a certificate of the cluster CA (a real uvicorn on 127.0.0.1)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from rbee.errors import RbeeError
from rbee.tls import ClusterCA
from rbee_queen.http.asgi import create_app
from rbee_queen.http.auth import Authenticator
from rbee_queen.http.listener import HttpServer, bind_http, tls_files


def test_loopback_is_plain_beyond_it_a_cluster_ca_certificate_unless_insecure(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path / "home")
    tls_dir = tmp_path / "home" / "tls"
    assert tls_files("127.0.0.1", False, None, None, ca, tls_dir) == (None, None)
    assert tls_files("0.0.0.0", True, None, None, ca, tls_dir) == (None, None)
    cert, key = tls_files("0.0.0.0", False, None, None, ca, tls_dir)
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE") and key.stat().st_mode & 0o077 == 0
    given = (tmp_path / "c.pem", tmp_path / "k.pem")
    for path in given:
        path.write_text("x")
    assert tls_files("127.0.0.1", False, *given, ca, tls_dir) == given  # the operator's, even on loopback
    with pytest.raises(RbeeError) as err:
        tls_files("0.0.0.0", False, given[0], None, ca, tls_dir)
    assert err.value.code == "INVALID_CONFIG"
    with pytest.raises(RbeeError) as err:
        tls_files("0.0.0.0", False, tmp_path / "none.pem", given[1], ca, tls_dir)
    assert err.value.code == "TLS_FILE_INVALID"


def test_a_taken_port_is_port_in_use_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(RbeeError) as err:
            bind_http("127.0.0.1", taken.getsockname()[1])
    assert err.value.code == "PORT_IN_USE" and "--http-port" in " ".join(err.value.suggestions)


async def test_https_with_a_certificate_of_the_cluster_ca(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path / "home")
    identity = ca.server_identity("queen-rbee http", ["127.0.0.1", "localhost"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(identity.cert)
    key.write_bytes(identity.key)
    server = HttpServer(create_app(Authenticator("k")))
    port = await server.start("127.0.0.1", 0, cert, key)
    try:
        assert server.scheme == "https"
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca.ca_path))) as http:
            resp = await http.get(f"https://localhost:{port}/health")
        assert resp.status_code == 200 and resp.json()["status"] == "ok"
        async with httpx.AsyncClient() as http:  # the system's trust store does not know the cluster CA
            with pytest.raises(httpx.ConnectError):
                await http.get(f"https://localhost:{port}/health")
    finally:
        await server.stop()
