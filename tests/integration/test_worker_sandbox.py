"""Code in a worker cannot read its hive's secrets (docs/security.md): a real
hive with the node's certificates spawns the real worker program (its own
servicer on the fake engine) behind a probe (tests/fixtures/worker_probe.py)
that tries to read the hive's key files, its environment and its memory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rbee.tls import CA_CERT, HIVE_CERT, HIVE_KEY, ISSUER_CERT, ISSUER_KEY, ClusterCA
from rbee.tls_identity import node_identity, worker_identity
from rbee_hive.workers.sandbox import landlock_abi
from tests.fixtures.common import REPO, health_status
from tests.fixtures.hive import HIVE_KEY as HIVE_API_KEY

pytestmark = pytest.mark.asyncio(loop_scope="session")
MARKER = "hf_secret_marker_4242"


def real_worker_program(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "llm-worker-rbee"
    program.write_text(f'#!/bin/sh\ncd "{REPO}"\nexec "{sys.executable}" -m tests.fixtures.worker_probe "$@"\n')
    program.chmod(0o755)
    return program


def probes(log: str) -> dict[str, str]:
    out = {}
    for line in log.splitlines():
        if "probe " in line:
            path, _, result = line.partition("probe ")[2].partition(": ")
            out[path] = result.strip()
    return out


@pytest.mark.skipif(landlock_abi() <= 0, reason="this kernel has no Landlock (the hive says so in its log)")
async def test_a_worker_cannot_read_its_hives_keys_environment_or_memory(start_hive, model: Path, tmp_path: Path) -> None:
    # Where the queen puts them: the hive's key file and certificates in its home.
    home = tmp_path / "home"
    tls_dir = home / "tls"
    tls_dir.mkdir(parents=True, mode=0o700)
    for name, (data, mode) in ClusterCA(tmp_path / "queen").node_bundle("box", ["127.0.0.1"]).items():
        (tls_dir / name).write_bytes(data)
        (tls_dir / name).chmod(mode)
    (home / "hive.key").write_text(HIVE_API_KEY + "\n")
    (home / "hive.key").chmod(0o600)
    ca = ClusterCA(tmp_path / "queen")
    targets = [home / "hive.key", tls_dir / HIVE_KEY, tls_dir / ISSUER_KEY, home / "models.db", model / "model.safetensors"]
    hive = await start_hive(
        home=home, worker_binary=real_worker_program(tmp_path / "bin"), model_dirs=[model.parent], tls=ca.client_identity(),
        extra_env={
            "HF_TOKEN": MARKER, "RBEE_HIVE_WORKER_ENV": "WORKER_PROBE*", "WORKER_PROBE_MARKER": f"HF_TOKEN={MARKER}".encode().hex(),
            "WORKER_PROBE": "|".join([*map(str, targets), "/proc/{ppid}/environ", "/proc/{ppid}/mem"]),
        },
        args=["--tls-cert", str(tls_dir / HIVE_CERT), "--tls-key", str(tls_dir / HIVE_KEY), "--tls-ca", str(tls_dir / CA_CERT),
              "--tls-issuer-cert", str(tls_dir / ISSUER_CERT), "--tls-issuer-key", str(tls_dir / ISSUER_KEY)],
    )  # fmt: skip
    # The hive says what protects it from its workers.
    assert "Landlock sandbox" in hive.text() and "HF_TOKEN" in hive.text()
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    items = await hive.follow(reply.worker.id)
    worker = items[-1].worker
    assert worker.tls and worker.state == 2  # IDLE: it read its model, its own certificate, and serves
    seen = probes((home / "logs" / f"{worker.id}.log").read_text())
    pid = hive.proc.pid
    assert seen[str(home / "hive.key")].startswith("denied")
    assert seen[str(tls_dir / HIVE_KEY)].startswith("denied")
    assert seen[str(tls_dir / ISSUER_KEY)].startswith("denied")
    assert seen[str(home / "models.db")].startswith("denied")
    assert seen[str(model / "model.safetensors")] == "read"
    # The hive's environment block holds no secret any more; its memory is closed.
    assert seen[f"/proc/{pid}/environ"] in ("read", "denied EACCES", "denied EPERM"), "HF_TOKEN= readable in the hive's environ"
    assert seen[f"/proc/{pid}/mem"].startswith("denied")
    assert seen["environment"] == "no secrets"
    # Its certificate is its own (signed by the hive's issuing certificate), not the hive's.
    own = (home / "tls" / "workers" / worker.id / "tls.crt").read_bytes()
    assert own.split(b"-----END CERTIFICATE-----")[0] != (tls_dir / HIVE_CERT).read_bytes().split(b"-----END CERTIFICATE-----")[0]
    assert os.path.exists(home / "tls" / "workers" / worker.id / "tls.key")
    # It proves a name of its own below its node's identity (rbee/tls_identity.py), which the hive reports.
    assert worker.tls_name == worker_identity(node_identity("box"), worker.id)
    client = ca.client_identity()
    assert await health_status(worker.address, client.for_peer(worker.tls_name)) == "SERVING"
    assert await health_status(worker.address, client.for_peer(node_identity("box"))) == "refused: UNAVAILABLE"
