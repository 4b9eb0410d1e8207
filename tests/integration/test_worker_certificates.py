"""A worker never gets its hive's own certificate (docs/security.md): a hive
given a certificate but no issuing certificate, whose workers could then not
call it back over mutual TLS, refuses to start and says what to pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.tls import CA_CERT, HIVE_CERT, HIVE_KEY, ClusterCA
from tests.fixtures.hive import start_hive_process

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_hive_with_a_certificate_but_no_issuing_certificate_refuses_to_start(standin_program, tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path / "queen")
    folder = tmp_path / "node-tls"
    folder.mkdir(mode=0o700)
    for name, (data, mode) in ca.node_bundle("box", ["127.0.0.1"]).items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(mode)
    with pytest.raises(RuntimeError) as err:
        await start_hive_process(
            tmp_path / "home", worker_binary=standin_program, tls=ca.client_identity(),
            args=["--tls-cert", str(folder / HIVE_CERT), "--tls-key", str(folder / HIVE_KEY), "--tls-ca", str(folder / CA_CERT)],
        )  # fmt: skip
    text = str(err.value)
    assert "TLS_REQUIRED" in text and "--tls-issuer-cert" in text and "Traceback" not in text
