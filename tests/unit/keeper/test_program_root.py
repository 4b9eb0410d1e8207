"""The root command both typer programs get from rbee.cli_common.make_app:
--version, help without arguments, no completion commands."""

from __future__ import annotations

import subprocess

import pytest

from rbee.config import VERSION
from tests.fixtures.common import VENV_BIN, proc_env

PROGRAMS = ["rbee-keeper", "rbee-hive"]


def run(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / program), *args], capture_output=True, text=True, env=proc_env(COLUMNS="200"), timeout=60)


@pytest.mark.parametrize("program", PROGRAMS)
def test_version(program):
    proc = run(program, "--version")
    assert proc.returncode == 0 and proc.stdout == f"{program} {VERSION}\n" and proc.stderr == ""


@pytest.mark.parametrize("program", PROGRAMS)
def test_no_arguments_is_help_with_the_root_options(program):
    proc = run(program)
    assert proc.returncode == 0
    assert f"Usage: {program}" in proc.stdout and "--version" in proc.stdout
    # Shell completion is installable for the command users type, not for the daemons.
    assert ("--install-completion" in proc.stdout) == (program == "rbee-keeper")


def test_each_program_keeps_its_own_help():
    assert "Run LLMs across the machines of your home lab" in run("rbee-keeper", "--help").stdout
    assert "The node's pool manager" in run("rbee-hive", "--help").stdout
