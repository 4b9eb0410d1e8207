"""Steps for keeper_cli.feature (S11, S9 connection retries, S2 output): the
installed `rbee-keeper` console script as a process, a temporary HOME per
scenario, `{free port}` placeholders filled with ports nothing listens on."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.ports import free_port

scenarios("keeper_cli.feature")


@dataclass
class Cli:
    home: Path
    ports: dict[str, int] = field(default_factory=dict)
    result: subprocess.CompletedProcess | None = None
    retries: list[str] = field(default_factory=list)

    def fill(self, text: str) -> str:
        """{free port} / {free port A} → a port nothing listens on (the same one per name)."""

        def port(match: re.Match) -> str:
            return str(self.ports.setdefault(match.group(0), free_port()))

        return re.sub(r"\{free port(?: [A-Z])?\}", port, text)

    def path(self, text: str) -> Path:
        return self.home / text.removeprefix("~/")

    def run(self, command: str, **env: str) -> subprocess.CompletedProcess:
        words = shlex.split(self.fill(command))
        assert words[0] == "rbee-keeper"
        environment = proc_env(HOME=str(self.home), RBEE_HOME=str(self.home / ".rbee"), NO_COLOR="1", COLUMNS="200")
        for name in ("RBEE_CONFIG", "RBEE_API_KEY", "RBEE_QUEEN_API_KEY", "RBEE_NODE", "RBEE_QUEEN", "RBEE_HIVE"):
            environment.pop(name, None)
        environment.update({k: self.fill(v) for k, v in env.items()})
        self.result = subprocess.run([str(VENV_BIN / "rbee-keeper"), *words[1:]], capture_output=True, text=True,
                                     env=environment, timeout=120)  # fmt: skip
        return self.result

    @property
    def last(self) -> subprocess.CompletedProcess:
        assert self.result is not None, "no command was run"
        return self.result


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


# -- given ----------------------------------------------------------------------------------


@given(parsers.parse('the config file "{where}" says:'))
def _config(cli: Cli, where: str, docstring: str) -> None:
    path = cli.path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cli.fill(docstring) + "\n")
    path.chmod(0o600)  # it may hold a key: rbee refuses one other users can read


@given("a gRPC server that starts listening on a free port after 300 ms", target_fixture="late_port")
def _late_server() -> int:
    return free_port()


# -- when -----------------------------------------------------------------------------------


@when(parsers.re(r'I run "(?P<command>[^"]+)" with (?P<var>[A-Z_]+)="(?P<value>[^"]+)"'))
def _run_with_env(cli: Cli, command: str, var: str, value: str) -> None:
    cli.run(command, **{var: value})


@when(parsers.re(r'I run "(?P<command>[^"]+)"$'))
def _run(cli: Cli, command: str) -> None:
    cli.run(command)


@when(parsers.parse('I change "{where}"'))
def _change(cli: Cli, where: str) -> None:
    cli.path(where).write_text('[keeper]\nnode = "mine"\n')


@when("the keeper connects to it as a hive")
def _connect_late(cli: Cli, late_port: int) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from rbee_keeper.hive_client import HiveClient

    async def scenario() -> None:
        async def serve() -> grpc.aio.Server:
            await asyncio.sleep(0.3)
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            server.add_insecure_port(f"127.0.0.1:{late_port}")
            await server.start()
            return server

        starting = asyncio.create_task(serve())
        client = HiveClient(f"127.0.0.1:{late_port}", "k", "--api-key")
        client.on_retry = cli.retries.append
        try:
            await client.ensure_connected()
        finally:
            await client.close()
            await (await starting).stop(None)

    asyncio.run(scenario())


# -- then -----------------------------------------------------------------------------------


@then(parsers.parse("the exit code is {code:d}"))
def _exit_code(cli: Cli, code: int) -> None:
    assert cli.last.returncode == code, f"exit {cli.last.returncode}\n{cli.last.stdout}\n{cli.last.stderr}"


@then(parsers.parse('stdout contains "{text}"'))
def _stdout_contains(cli: Cli, text: str) -> None:
    assert text in cli.last.stdout, cli.last.stdout


@then(parsers.parse('stdout is "{text}"'))
def _stdout_is(cli: Cli, text: str) -> None:
    assert cli.last.stdout == text + "\n", cli.last.stdout


@then("stdout is empty")
def _stdout_empty(cli: Cli) -> None:
    assert cli.last.stdout == "", cli.last.stdout


@then("stderr is empty")
def _stderr_empty(cli: Cli) -> None:
    assert cli.last.stderr == "", cli.last.stderr


@then(parsers.parse('stderr contains "{text}"'))
def _stderr_contains(cli: Cli, text: str) -> None:
    assert text in cli.last.stderr, cli.last.stderr


@then(parsers.parse('stderr does not contain "{text}"'))
def _stderr_lacks(cli: Cli, text: str) -> None:
    assert text not in cli.last.stderr, cli.last.stderr


@then(parsers.parse('"{where}" is a link to the installed program'))
def _is_link(cli: Cli, where: str) -> None:
    path = cli.path(where)
    assert path.is_symlink() and Path(os.readlink(path)) == Path(sys.executable).parent / path.name


@then(parsers.parse('"{where}" exists'))
def _exists(cli: Cli, where: str) -> None:
    assert cli.path(where).is_file()


@then(parsers.parse('"{where}" is a folder'))
def _folder(cli: Cli, where: str) -> None:
    assert cli.path(where).is_dir()


@then(parsers.parse('"{where}" still holds my change'))
def _unchanged(cli: Cli, where: str) -> None:
    assert cli.path(where).read_text() == '[keeper]\nnode = "mine"\n'


@then(parsers.parse('the queen it tried was "{port}"'))
def _queen_tried(cli: Cli, port: str) -> None:
    line = next(l for l in cli.last.stderr.splitlines() if "CONNECTION_TIMEOUT" in l)
    assert f"127.0.0.1:{cli.fill(port)} " in line, line


@then(parsers.parse("it is connected after {n:d} retries"))
def _connected_after(cli: Cli, n: int) -> None:
    assert len(cli.retries) == n, cli.retries
