"""The fuzz suite's daemons (real processes, each on its own RBEE_HOME) and
its budget. `make test` runs a bounded, reproducible number of examples;
`make fuzz` sets RBEE_FUZZ_SCALE (and a random seed) for many more."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from tests.fixtures.common import REPO, STARTING_DAEMON_OPTIONS, VENV_BIN, proc_env
from tests.fixtures.hive import confinement_env, free_port_block, kill_pids, write_standin_program

SCALE = max(1, int(os.environ.get("RBEE_FUZZ_SCALE", "1")))
# A reproducible sample in CI; `make fuzz` explores (and prints the seed of a failure).
settings.register_profile(
    "rbee-ci", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.register_profile(
    "rbee-fuzz", derandomize=False, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.load_profile("rbee-fuzz" if SCALE > 1 else "rbee-ci")


def examples(n: int) -> int:
    return n * SCALE


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    port: int
    key: str
    home: Path
    output: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def assert_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.text()[-4000:]}"

    def assert_serving(self, channel: grpc.Channel) -> None:
        self.assert_alive()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{self.name} health {reply.status}"


def _start(name: str, argv: list[str], env: dict[str, str], port: int, key: str, home: Path) -> Daemon:
    output = home / f"{name}.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(REPO), start_new_session=True)  # fmt: skip
    daemon = Daemon(name, proc, port, key, home, output)
    with grpc.insecure_channel(daemon.address, options=STARTING_DAEMON_OPTIONS) as channel:
        deadline = time.monotonic() + 60
        while True:
            daemon.assert_alive()
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                daemon.assert_serving(channel)
                return daemon
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    _stop(daemon)
                    raise AssertionError(f"{name} did not answer within 60 s:\n{daemon.text()[-4000:]}") from None


def _stop(daemon: Daemon) -> None:
    pids = set()
    try:
        pids = {p.pid for p in psutil.Process(daemon.proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    kill_pids(pids | {daemon.proc.pid})
    daemon.proc.wait(10)


@pytest.fixture(scope="module")
def fuzz_hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A hive whose workers are the stand-in program; models only from its
    own folders; the hub offline (nothing leaves the machine)."""
    base = tmp_path_factory.mktemp("fuzz-hive")
    home, extra = base / "home", base / "models-extra"
    home.mkdir()
    (extra / "tiny").mkdir(parents=True)
    (extra / "tiny" / "model.safetensors").write_bytes(b"\0" * 4096)
    (home / "no-config.toml").write_text("")
    program = write_standin_program(base / "bin")
    port = free_port_block(7)
    key = "fuzz-hive-key"
    env = proc_env(
        RBEE_HOME=str(home), RBEE_CONFIG=str(home / "no-config.toml"), RBEE_HIVE_API_KEY=key,
        RBEE_HIVE_WORKER_PORT_START=str(port + 1), RBEE_HIVE_WORKER_PORT_END=str(port + 6),
        RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_SHUTDOWN_GRACE="2s", RBEE_HIVE_KILL_WAIT="1s",
        STANDIN_LOAD_S="0.05", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
        **confinement_env(home, model_dirs=[extra]),
    )  # fmt: skip
    daemon = _start("rbee-hive", [str(VENV_BIN / "rbee-hive"), "daemon", "--port", str(port)], env, port, key, home)
    daemon.extra_models = extra  # type: ignore[attr-defined]
    yield daemon
    _stop(daemon)


@pytest.fixture(scope="module")
def fuzz_queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A queen with one registered node, "box", whose SSH and hive ports on
    127.0.0.1 are closed: every path to a node fails fast, on loopback."""
    from rbee_queen.nodes.store import NodeRecord, NodeStore

    base = tmp_path_factory.mktemp("fuzz-queen")
    home, user_home = base / "home", base / "user"
    home.mkdir()
    user_home.mkdir()
    (home / "no-config.toml").write_text("")
    port, closed = free_port_block(3), None
    closed = port + 1  # free now; nothing listens there
    import asyncssh

    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(base / "id_ed25519"))
    os.chmod(base / "id_ed25519", 0o600)
    store = NodeStore(home / "beehives.db")
    store.add(NodeRecord(name="box", transport="ssh", install_path="/opt/rbee", hive_key="box-hive-key",
                         ssh_host="127.0.0.1", ssh_port=closed, ssh_user="me", ssh_key_path=str(base / "id_ed25519"),
                         hive_port=closed))  # fmt: skip
    store.close()
    key = "fuzz-queen-key"
    env = proc_env(
        RBEE_HOME=str(home), HOME=str(user_home), RBEE_CONFIG=str(home / "no-config.toml"), RBEE_QUEEN_API_KEY=key,
        RBEE_QUEEN_SSH_CONNECT_TIMEOUT="1s", RBEE_QUEEN_HIVE_START_TIMEOUT="2s", HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
    )  # fmt: skip
    daemon = _start("queen-rbee", [str(VENV_BIN / "queen-rbee"), "daemon", "--port", str(port)], env, port, key, home)
    yield daemon
    _stop(daemon)
