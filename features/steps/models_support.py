"""Blocking helpers for the S5 step modules: a real rbee-hive process pointed
at the test hub, rbee-keeper runs, and the ProvisioningService."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.backends import backend_enum
from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import format_line
from rbee.v1 import provisioning_pb2, provisioning_pb2_grpc
from tests.fixtures.common import REPO, STARTING_DAEMON_OPTIONS, VENV_BIN, proc_env
from tests.fixtures.hive import confinement_env, free_port_block
from tests.fixtures.keeper import KeeperProcess
from tests.fixtures.models import TEST_STALL_S

KEY = "feature-hive-key"
WAIT_S = 300


class SyncHive:
    """rbee-hive daemon as a child process (blocking API for steps)."""

    def __init__(self, home: Path, hub_endpoint: str, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "no-config.toml").write_text("")
        base = free_port_block(4)
        self.port = base
        env = proc_env(
            RBEE_HOME=str(home),
            RBEE_CONFIG=str(home / "no-config.toml"),
            RBEE_HIVE_API_KEY=KEY,
            RBEE_HIVE_WORKER_PORT_START=str(base + 1),
            RBEE_HIVE_WORKER_PORT_END=str(base + 3),
            HF_ENDPOINT=hub_endpoint,
            RBEE_DOWNLOAD_STALL_TIMEOUT_S=str(TEST_STALL_S),
            **confinement_env(home),
        )
        env.pop("HF_TOKEN", None)
        env.update(extra_env or {})
        self.output = home / "hive.out"
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "rbee-hive"), "daemon", "--port", str(base)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
            )  # fmt: skip
        self.channel = grpc.insecure_channel(self.address, options=STARTING_DAEMON_OPTIONS)
        try:
            health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60
            )
        except grpc.RpcError:
            self.stop()
            raise RuntimeError(f"rbee-hive did not start:\n{self.output.read_text(errors='replace')}") from None
        self.stub = provisioning_pb2_grpc.ProvisioningServiceStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(KEY)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.channel.close()
        pids = set()
        try:
            pids = {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass

    def list_models(self) -> list[provisioning_pb2.ModelEntry]:
        return list(self.stub.ListModels(provisioning_pb2.ListModelsRequest(), metadata=self.md, timeout=60).models)

    def download(self, model_ref: str) -> tuple[list[str], provisioning_pb2.ModelEntry | None, RbeeError | None]:
        lines: list[str] = []
        try:
            for msg in self.stub.DownloadModel(
                provisioning_pb2.DownloadModelRequest(model_ref=model_ref), metadata=self.md, timeout=WAIT_S
            ):
                if msg.HasField("model"):
                    return lines, msg.model, None
                if msg.event.HasField("narration"):
                    lines.append(format_line(msg.event.narration))
        except grpc.RpcError as err:
            return lines, None, from_rpc_error(err, self.address)
        return lines, None, None

    def provision(self, backend: str, source: str = "", force: bool = False):
        lines: list[str] = []
        try:
            for msg in self.stub.ProvisionWorker(
                provisioning_pb2.ProvisionWorkerRequest(backend=backend_enum(backend), source=source, force=force),
                metadata=self.md, timeout=900,
            ):  # fmt: skip
                if msg.HasField("environment"):
                    return lines, msg.environment, None
                if msg.event.HasField("narration"):
                    lines.append(format_line(msg.event.narration))
        except grpc.RpcError as err:
            return lines, None, from_rpc_error(err, self.address)
        return lines, None, None


@dataclass
class KeeperRun:
    code: int
    stdout: str
    stderr: str


def keeper_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    run_env = proc_env(RBEE_API_KEY=KEY, HOME=str(Path(os.environ.get("TMPDIR", "/tmp"))))
    run_env.pop("RBEE_CONFIG", None)
    run_env.update(extra or {})
    return run_env


def keeper_process(*args: str) -> KeeperProcess:
    """A running rbee-keeper whose output can be waited on as it arrives."""
    return KeeperProcess(list(args), keeper_env())


def keeper(*args: str, hive: str | None = None, env: dict[str, str] | None = None) -> KeeperRun:
    run_env = keeper_env(env)
    cmd = [str(VENV_BIN / "rbee-keeper"), *args]
    if hive:
        cmd += ["--hive", hive]
    done = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=WAIT_S, stdin=subprocess.DEVNULL)
    return KeeperRun(done.returncode, done.stdout, done.stderr)
