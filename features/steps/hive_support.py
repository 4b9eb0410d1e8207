"""A real rbee-hive process for the (synchronous) Gherkin steps: started with
its own RBEE_HOME and worker port block, waited on through health (failing
fast if it exits), called with blocking stubs, stopped with its whole tree."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.backends import backend_enum
from rbee.channel import CHANNEL_OPTIONS
from rbee.errors import RbeeError, from_rpc_error
from rbee.v1 import common_pb2, preflight_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.fixtures.common import REPO, STARTING_DAEMON_OPTIONS, VENV_BIN, proc_env
from tests.fixtures.hive import HIVE_KEY, alive_pids, confinement_env, free_port_block, kill_pids

MB = 1024 * 1024
IDLE = common_pb2.WORKER_STATE_IDLE


@dataclass
class Hive:
    proc: subprocess.Popen
    port: int
    home: Path
    output: Path
    worker_ports: tuple[int, int]
    channel: grpc.Channel
    known: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def md(self):
        return auth_metadata(HIVE_KEY)

    @property
    def workers(self) -> registry_pb2_grpc.HiveWorkerServiceStub:
        return registry_pb2_grpc.HiveWorkerServiceStub(self.channel)

    @property
    def preflight(self) -> preflight_pb2_grpc.PreflightServiceStub:
        return preflight_pb2_grpc.PreflightServiceStub(self.channel)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def call(self, method: Any, request: Any, timeout: float = 120) -> Any:
        try:
            return method(request, metadata=self.md, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None

    def remember(self) -> None:
        try:
            self.known.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def spawn(self, **fields: Any) -> registry_pb2.SpawnWorkerResponse:
        if isinstance(fields.get("backend"), str):
            fields["backend"] = backend_enum(fields["backend"])
        reply = self.call(self.workers.SpawnWorker, registry_pb2.SpawnWorkerRequest(**fields), 600)
        self.remember()
        return reply

    def follow(self, worker_id: str) -> tuple[list, RbeeError | None]:
        items: list = []
        try:
            for item in self.workers.FollowWorker(
                registry_pb2.FollowWorkerRequest(worker_id=worker_id), metadata=self.md, timeout=600
            ):
                items.append(item)
                self.remember()
        except grpc.RpcError as err:
            return items, from_rpc_error(err, self.address)
        return items, None

    def list(self, **fields: Any) -> list:
        return list(self.call(self.workers.ListWorkers, registry_pb2.ListWorkersRequest(**fields)).workers)

    def wait_for_line(self, needle: str | tuple[str, ...], timeout: float = 120) -> str:
        """Follow the hive's own log (a stream, not a polling loop) until a line has ``needle``
        (or one of several)."""
        needles = (needle,) if isinstance(needle, str) else needle
        call = self.workers.StreamLogs(
            registry_pb2.StreamLogsRequest(worker_id="rbee-hive", tail_lines=10000, follow=True),
            metadata=self.md,
            timeout=timeout,
        )
        try:
            for msg in call:
                if any(n in msg.line for n in needles):
                    return msg.line
        except grpc.RpcError as err:
            raise AssertionError(f"no hive line with {needle!r} ({err.code().name}):\n{self.text()}") from None
        finally:
            call.cancel()
        raise AssertionError(f"hive log ended without {needle!r}")

    def terminate(self, timeout: float = 120) -> int:
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> list[int]:
        return alive_pids(self.known)

    def close(self) -> None:
        self.remember()
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        kill_pids(self.known | {self.proc.pid})
        if self.proc.poll() is None:
            self.proc.wait()


def start_hive(home: Path, worker_binary: Path | None = None, env: dict[str, str] | None = None, block: int = 6) -> Hive:
    home.mkdir(parents=True, exist_ok=True)
    (home / "no-config.toml").write_text("")
    base = free_port_block(block + 1)
    variables = proc_env(
        RBEE_HOME=str(home),
        RBEE_CONFIG=str(home / "no-config.toml"),
        RBEE_HIVE_API_KEY=HIVE_KEY,
        RBEE_HIVE_WORKER_PORT_START=str(base + 1),
        RBEE_HIVE_WORKER_PORT_END=str(base + block),
        **confinement_env(home),
    )
    if worker_binary is not None:
        variables["RBEE_HIVE_WORKER_BINARY"] = str(worker_binary)
    variables.update(env or {})
    output = home / f"hive-{base}.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "rbee-hive"), "daemon", "--port", str(base)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=variables, cwd=str(REPO),
        )  # fmt: skip
    channel = grpc.insecure_channel(f"127.0.0.1:{base}", options=(*CHANNEL_OPTIONS, *STARTING_DAEMON_OPTIONS))
    hive = Hive(proc, base, home, output, (base + 1, base + block), channel)
    ready = grpc.channel_ready_future(channel)
    deadline = time.monotonic() + 60
    # Wait on the channel (an event), checking between short waits that the process lives.
    while True:
        try:
            ready.result(timeout=0.5)
            break
        except grpc.FutureTimeoutError:
            if proc.poll() is not None or time.monotonic() > deadline:
                hive.close()
                raise RuntimeError(f"rbee-hive did not start (exit {proc.returncode}):\n{output.read_text()}") from None
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return hive


def write_figures(path: Path, **figures: Any) -> Path:
    path.write_text(json.dumps(figures))
    return path


def tiny_model(folder: Path, size: int = 4096) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    return folder


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
