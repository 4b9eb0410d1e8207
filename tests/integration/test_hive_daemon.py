"""rbee-hive as a real process: detect, health and version, API keys, the
preflight figures driven through the resource override file (each check on
both sides of its boundary), a missing worker program, keeper's shutdown of
one worker, and SIGTERM with nothing running."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from rbee.backends import backend_enum
from rbee.enum_words import RESOURCES
from rbee.errors import RbeeError
from rbee.v1 import preflight_pb2
from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.hive import HIVE_KEY, HiveProc, write_overrides

session_loop = pytest.mark.asyncio(loop_scope="session")

MB = 1024 * 1024
SIZE = 1000 * MB  # needs 1200 MB of RAM/VRAM


def run_hive_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "rbee-hive"), *args], capture_output=True, text=True, env=proc_env(**env), timeout=120)


def test_detect_prints_human_and_registry_forms(tmp_path):
    out = run_hive_cli("detect", RBEE_CONFIG=str(tmp_path / "none.toml"))
    assert out.returncode == 1 and "Config file not found" in out.stderr  # RBEE_CONFIG must exist
    (tmp_path / "c.toml").write_text("")
    out = run_hive_cli("detect", RBEE_CONFIG=str(tmp_path / "c.toml"))
    assert out.returncode == 0, out.stderr
    assert "✅ cpu: 1 device [0]" in out.stdout
    assert 'backends: ["cpu"' in out.stdout and 'devices: {"cpu": 1' in out.stdout
    form = json.loads(run_hive_cli("detect", "--json", RBEE_CONFIG=str(tmp_path / "c.toml")).stdout)
    assert form["backends"][0] == "cpu" and form["devices"]["cpu"] == 1
    assert set(form["devices"]) == set(form["backends"])


def test_detect_reports_pinned_gpus(tmp_path):
    (tmp_path / "c.toml").write_text("")
    figures = write_overrides(
        tmp_path / "f.json",
        gpus=[{"name": "A", "vram_total_bytes": 8 * MB, "vram_available_bytes": 8 * MB}] * 2,
    )
    out = run_hive_cli("detect", RBEE_CONFIG=str(tmp_path / "c.toml"), RBEE_HIVE_RESOURCE_OVERRIDES=str(figures))
    assert 'backends: ["cpu", "cuda"]' in out.stdout and 'devices: {"cpu": 1, "cuda": 2}' in out.stdout


def test_daemon_without_api_key_refuses_to_start(tmp_path):
    (tmp_path / "c.toml").write_text("")
    out = run_hive_cli("daemon", "--port", "0", RBEE_CONFIG=str(tmp_path / "c.toml"), RBEE_HOME=str(tmp_path))
    assert out.returncode == 1
    assert "MISSING_API_KEY" in out.stderr and "Traceback" not in out.stderr


def test_daemon_on_a_taken_port_says_so(tmp_path):
    (tmp_path / "c.toml").write_text("")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        out = run_hive_cli(
            "daemon", "--port", str(port), RBEE_CONFIG=str(tmp_path / "c.toml"), RBEE_HOME=str(tmp_path), RBEE_HIVE_API_KEY="k"
        )
    assert out.returncode == 1
    assert "PORT_IN_USE" in out.stderr and f"127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


@session_loop
async def test_a_second_hive_on_a_running_hives_port_says_so(start_hive, tmp_path):
    """gRPC would share a port between two servers (SO_REUSEPORT); the hive refuses."""
    first: HiveProc = await start_hive()
    (tmp_path / "c.toml").write_text("")
    out = await asyncio.to_thread(
        run_hive_cli, "daemon", "--port", str(first.port), RBEE_CONFIG=str(tmp_path / "c.toml"),
        RBEE_HOME=str(tmp_path / "second"), RBEE_HIVE_API_KEY="k",
    )
    assert out.returncode == 1, out.stderr
    assert "PORT_IN_USE" in out.stderr and first.address in out.stderr and "Traceback" not in out.stderr
    reply = await first.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@session_loop
async def test_health_version_and_keys(start_hive):
    hive: HiveProc = await start_hive()
    reply = await hive.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = await hive.call(hive.preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())
    assert (info.hive_status, info.version, info.api_version) == (preflight_pb2.GetHiveHealthResponse.HIVE_STATUS_HEALTHY, "0.1.0", "v1")
    hive.api_key = "wrong"
    with pytest.raises(RbeeError) as exc:
        await hive.call(hive.preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())
    assert exc.value.code == "INVALID_API_KEY"
    hive.api_key = HIVE_KEY
    assert HIVE_KEY not in hive.text()  # never logged


async def check(hive: HiveProc, **fields) -> preflight_pb2.CheckWorkerResourcesResponse:
    fields["backend"] = backend_enum(fields.get("backend"))
    return await hive.call(hive.preflight.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(**fields))


async def refused(hive: HiveProc, **fields) -> RbeeError:
    with pytest.raises(RbeeError) as exc:
        await check(hive, **fields)
    return exc.value


@session_loop
async def test_preflight_figures_both_ways_through_a_real_hive(start_hive, tmp_path):
    figures = tmp_path / "figures.json"
    gpu = lambda free: {"name": "Pinned GPU", "vram_total_bytes": 24000 * MB, "vram_available_bytes": free}  # noqa: E731
    write_overrides(figures, ram_available_bytes=1200 * MB, disk_available_bytes=SIZE, gpus=[gpu(1200 * MB), gpu(0)])
    hive: HiveProc = await start_hive(extra_env={"RBEE_HIVE_RESOURCE_OVERRIDES": str(figures)})
    assert "Resource figures overridden by" in hive.text()

    ok = await check(hive, model_size_bytes=SIZE, backend="cuda", device=0, needs_download=True)
    assert [(RESOURCES.word(c.resource), c.required_bytes, c.available_bytes) for c in ok.checks if c.required_bytes] == [
        ("disk", 1000 * MB, 1000 * MB), ("ram", 1200 * MB, 1200 * MB), ("vram", 1200 * MB, 1200 * MB)
    ]  # fmt: skip

    # Each figure one byte short: the same hive, the file re-read on every query.
    write_overrides(figures, ram_available_bytes=1200 * MB - 1, disk_available_bytes=SIZE, gpus=[gpu(1200 * MB)])
    err = await refused(hive, model_size_bytes=SIZE, backend="cpu")
    assert (err.code, err.details["required_mb"], err.details["available_mb"]) == ("INSUFFICIENT_RAM", "1200", "1199")

    write_overrides(figures, ram_available_bytes=64000 * MB, gpus=[gpu(1200 * MB - 1)])
    err = await refused(hive, model_size_bytes=SIZE, backend="cuda", device=0)
    assert (err.code, err.details["required_mb"], err.details["available_mb"]) == ("VRAM_EXHAUSTED", "1200", "1199")

    write_overrides(figures, ram_available_bytes=64000 * MB, disk_available_bytes=SIZE - 250 * MB, gpus=[gpu(1200 * MB)])
    err = await refused(hive, model_size_bytes=SIZE, backend="cpu", needs_download=True)
    assert (err.code, err.details["to_free_mb"]) == ("INSUFFICIENT_DISK", "250")
    assert any("rbee-keeper models rm" in s for s in err.suggestions)

    err = await refused(hive, model_size_bytes=SIZE, backend="cuda", device=5)
    assert (err.code, err.message) == ("DEVICE_NOT_AVAILABLE", "Device 5 not available. Available: [0]")

    write_overrides(figures, gpus=[])  # no GPU: cuda is refused, never replaced by cpu
    err = await refused(hive, model_size_bytes=SIZE, backend="cuda", device=0)
    assert err.code == "BACKEND_UNAVAILABLE" and "CUDA" in err.message and err.details["available"] == "cpu"
    assert (await refused(hive, model_size_bytes=SIZE, backend="metal")).code == "BACKEND_UNAVAILABLE"


@session_loop
async def test_spawn_is_refused_with_figures_before_any_process_starts(start_hive, standin_program, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * (10 * MB))
    figures = write_overrides(tmp_path / "f.json", ram_available_bytes=5 * MB)
    hive: HiveProc = await start_hive(worker_binary=standin_program, extra_env={"RBEE_HIVE_RESOURCE_OVERRIDES": str(figures)})
    with pytest.raises(RbeeError) as exc:
        await hive.spawn(model_path=str(model), backend="cpu", device=0)
    assert exc.value.code == "INSUFFICIENT_RAM" and exc.value.details["required_mb"] == "12"
    with pytest.raises(RbeeError) as exc:
        await hive.spawn(model_path=str(model), backend="cuda", device=0)
    assert exc.value.code == "BACKEND_UNAVAILABLE"
    with pytest.raises(RbeeError) as exc:
        await hive.spawn(model_path=str(tmp_path / "missing"), backend="cpu", device=0)
    assert exc.value.code == "MODEL_NOT_FOUND"
    assert hive.descendants() == [] and await hive.list() == []


@session_loop
async def test_missing_worker_program_names_the_path_and_the_fix(start_hive, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "w").write_bytes(b"x")
    expected = tmp_path / "not-installed" / "llm-worker-rbee"
    hive: HiveProc = await start_hive(worker_binary=expected)
    with pytest.raises(RbeeError) as exc:
        await hive.spawn(model_path=str(model), backend="cpu", device=0)
    assert exc.value.code == "WORKER_BINARY_NOT_FOUND"
    assert exc.value.message == f"Worker binary not found: {expected}"
    assert any("setup install" in s for s in exc.value.suggestions)


@session_loop
async def test_keeper_shuts_down_one_worker_by_id(start_hive, standin_program, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "w").write_bytes(b"x")
    hive: HiveProc = await start_hive(worker_binary=standin_program)
    first = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    second = await hive.spawn(model_path=str(model), backend="cpu", device=0, model_ref="file:///second")
    await hive.follow(first.worker.id)
    await hive.follow(second.worker.id)
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), "workers", "shutdown", "--hive", hive.address, "--api-key", HIVE_KEY, "--id", first.worker.id,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=proc_env(RBEE_CONFIG=str(hive.home / "no-config.toml")),
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"{first.worker.id} stopped (exited with code 0)" in err.decode()
    assert [w.id for w in await hive.list()] == [second.worker.id]
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), "workers", "shutdown", "--hive", hive.address, "--api-key", HIVE_KEY, "--id", "worker-nope",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=proc_env(RBEE_CONFIG=str(hive.home / "no-config.toml")),
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1 and "WORKER_NOT_FOUND" in err.decode()


@session_loop
async def test_sigterm_with_no_workers_exits_zero(start_hive):
    hive: HiveProc = await start_hive()
    assert await hive.terminate() == 0
    text = hive.text()
    assert "SIGTERM received: shutting down" in text and "No workers to stop" in text and "rbee-hive stopped" in text
    assert (hive.home / "logs" / "rbee-hive.log").read_text().count("rbee-hive stopped") == 1


