"""Encrypted links (S13) through real processes: a hive refuses to listen
beyond loopback without TLS unless --insecure (and then says so); a hive
started by hand with certificates of a cluster CA serves mutual TLS and signs
a certificate for each worker it starts, which serves mutual TLS too (the
stand-in worker speaks the real worker's TLS flags)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.channel import open_channel
from rbee.tls import CA_CERT, HIVE_CERT, HIVE_KEY, ISSUER_CERT, ISSUER_KEY, ClusterCA
from tests.fixtures.common import STARTING_DAEMON_OPTIONS, VENV_BIN, health_status, proc_env
from tests.fixtures.hive import HIVE_KEY as KEY, free_port_block

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _hive(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    (home / "c.toml").write_text("")
    return subprocess.run(
        [str(VENV_BIN / "rbee-hive"), "daemon", *args], capture_output=True, text=True, timeout=timeout,
        env=proc_env(RBEE_HOME=str(home), RBEE_CONFIG=str(home / "c.toml"), RBEE_HIVE_API_KEY=KEY),
    )  # fmt: skip




async def test_a_hive_beyond_loopback_needs_tls_or_insecure(tmp_path: Path) -> None:
    port = free_port_block(1)
    out = _hive(tmp_path / "plain", "--host", "0.0.0.0", "--port", str(port))
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert "TLS_REQUIRED" in text and f"0.0.0.0:{port}" in text and "--insecure" in text and "Traceback" not in text

    # --insecure: it listens, and says at start that keys cross the network in clear.
    home = tmp_path / "insecure"
    home.mkdir()
    (home / "c.toml").write_text("")
    log = (home / "out.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-hive"), "daemon", "--host", "0.0.0.0", "--port", str(port), "--insecure",
        stdout=log, stderr=asyncio.subprocess.STDOUT,
        env=proc_env(RBEE_HOME=str(home), RBEE_CONFIG=str(home / "c.toml"), RBEE_HIVE_API_KEY=KEY),
    )  # fmt: skip
    try:
        async with open_channel(f"127.0.0.1:{port}", options=STARTING_DAEMON_OPTIONS) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        text = (home / "out.log").read_text()
        assert "without TLS (--insecure)" in text and "plain gRPC" in text
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def test_a_hive_given_certificates_serves_mutual_tls_and_signs_its_workers(start_hive, standin_program, model: Path, tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path / "queen")
    tls_dir = tmp_path / "node-tls"
    tls_dir.mkdir(mode=0o700)
    for name, (data, mode) in ca.node_bundle("box", ["127.0.0.1"]).items():
        (tls_dir / name).write_bytes(data)
        (tls_dir / name).chmod(mode)
    client = ca.client_identity()
    hive = await start_hive(
        worker_binary=standin_program, model_dirs=[model.parent], tls=client,
        args=["--tls-cert", str(tls_dir / HIVE_CERT), "--tls-key", str(tls_dir / HIVE_KEY), "--tls-ca", str(tls_dir / CA_CERT),
              "--tls-issuer-cert", str(tls_dir / ISSUER_CERT), "--tls-issuer-key", str(tls_dir / ISSUER_KEY)],
    )  # fmt: skip
    assert "(mutual TLS)" in hive.text()
    # Clear text, or TLS without a certificate of the cluster CA, gets nowhere.
    assert await health_status(hive.address, None) == "refused: UNAVAILABLE"
    assert await health_status(hive.address, ClusterCA(tmp_path / "stranger").client_identity()) == "refused: UNAVAILABLE"
    assert await health_status(hive.address, client) == "SERVING"

    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    items = await hive.follow(reply.worker.id)  # the worker's callbacks reached the hive over mutual TLS
    worker = items[-1].worker
    assert worker.tls and worker.state == 2  # IDLE
    # Its own certificate, signed by the hive's issuing certificate, in a folder only the hive's user reads.
    folder = hive.home / "tls" / "workers" / worker.id
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder / "tls.key").st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((folder / "tls.crt").read_bytes())
    issuer = x509.load_pem_x509_certificates((tls_dir / ISSUER_CERT).read_bytes())[0]
    assert chain[0].issuer == issuer.subject and chain[0].subject != issuer.subject
    assert await health_status(worker.address, None) == "refused: UNAVAILABLE"
    assert await health_status(worker.address, client) == "SERVING"

    # The hive's calls to the worker (shutdown) go over mutual TLS too; its certificate goes with it.
    from rbee.v1 import registry_pb2

    await hive.call(hive.workers.ShutdownWorker, registry_pb2.ShutdownWorkerRequest(worker_id=worker.id))
    for _ in range(100):
        if not folder.exists():
            break
        await asyncio.sleep(0.1)
    assert not folder.exists()
    log = (hive.home / "logs" / f"{worker.id}.log").read_text()
    assert "Draining" in log and "SIGTERM" not in log  # the Shutdown RPC, not a signal


async def test_a_worker_beyond_loopback_needs_tls_or_insecure(default_model: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "llm-worker-rbee"), "--model", str(default_model), "--host", "0.0.0.0", "--port", str(free_port_block(1))],
        capture_output=True, text=True, timeout=120,
        env=proc_env(RBEE_WORKER_API_KEY="k", RBEE_HOME=str(tmp_path)),
    )  # fmt: skip
    # Refused before the model is loaded, with the ways out.
    assert out.returncode == 1
    assert "TLS_REQUIRED" in out.stdout and "--tls-cert" in out.stdout and "--insecure" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


async def test_a_queen_beyond_loopback_serves_mutual_tls_with_its_own_ca(tmp_path: Path) -> None:
    home = tmp_path / "queen-home"
    home.mkdir()
    (tmp_path / "c.toml").write_text("")
    port = free_port_block(1)
    env = proc_env(RBEE_HOME=str(home), HOME=str(tmp_path), RBEE_CONFIG=str(tmp_path / "c.toml"))
    log = (tmp_path / "queen.out").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "queen-rbee"), "daemon", "--host", "0.0.0.0", "--port", str(port),
        stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        client = None
        for _ in range(300):
            assert proc.returncode is None, (tmp_path / "queen.out").read_text()
            if (home / "tls" / "ca.crt").exists() and (home / "tls" / "ca.key").exists():
                client = client or ClusterCA(home).client_identity()
                if await health_status(address, client) == "SERVING":
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "queen.out").read_text())
        assert "Serving mutual TLS" in (home / "logs" / "queen.log").read_text()
        assert await health_status(address, None) == "refused: UNAVAILABLE"
        # The keeper on the queen's machine: told to use TLS, it presents the CA's client certificate.
        keeper = [str(VENV_BIN / "rbee-keeper"), "setup", "list-nodes", "--queen", address]
        run = await asyncio.to_thread(subprocess.run, keeper, capture_output=True, text=True, timeout=120, env={**env, "RBEE_TLS": "on"})
        assert run.returncode == 0 and "No nodes registered" in run.stderr + run.stdout, run
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def test_a_tls_queen_whose_http_port_is_taken_exits_cleanly_and_never_says_serving(tmp_path: Path) -> None:
    import socket

    home = tmp_path / "queen-home"
    home.mkdir()
    (tmp_path / "c.toml").write_text("")
    port, http_port = free_port_block(1), free_port_block(1)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", http_port))
        taken.listen()
        run = await asyncio.to_thread(
            subprocess.run,
            [str(VENV_BIN / "queen-rbee"), "daemon", "--host", "0.0.0.0", "--port", str(port), "--http-port", str(http_port)],
            capture_output=True, text=True, timeout=120,
            env=proc_env(RBEE_HOME=str(home), HOME=str(tmp_path), RBEE_CONFIG=str(tmp_path / "c.toml")),
        )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "PORT_IN_USE" in out and f"0.0.0.0:{http_port}" in out and "--http-port" in out, out
    # Its gRPC and enrolment servers were stopped, not left to the interpreter's exit.
    assert "Traceback" not in out and "never awaited" not in out, out
    assert "listening on" not in out, out
