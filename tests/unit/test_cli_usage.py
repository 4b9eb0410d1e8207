"""Usage mistakes get the project's error format and exit 1, not click's exit 2."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.common import VENV_BIN, proc_env


@pytest.mark.parametrize(
    ("program", "args", "needle"),
    [
        ("rbee-keeper", ["infer", "--max-tokenz", "3"], "No such option: --max-tokenz"),
        ("rbee-keeper", ["nonsense"], "No such command 'nonsense'"),
        ("rbee-hive", ["bogus"], "No such command 'bogus'"),
        ("queen-rbee", ["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_error_exits_1_with_code(program: str, args: list[str], needle: str) -> None:
    proc = subprocess.run([str(VENV_BIN / program), *args], capture_output=True, text=True, env=proc_env(), timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"[{program}] ❌ USAGE_ERROR: " in proc.stderr
    assert needle in proc.stderr
    assert "--help" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("program", "command"), [("rbee-keeper", "infer"), ("rbee-hive", "daemon"), ("queen-rbee", "daemon")])
def test_no_arguments_shows_help_once_and_exits_0(program: str, command: str) -> None:
    proc = subprocess.run([str(VENV_BIN / program)], capture_output=True, text=True, env=proc_env(), timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.count(f"Usage: {program}") == 1, proc.stdout
    assert command in proc.stdout


def test_queen_daemon_help_names_its_options() -> None:
    proc = subprocess.run([str(VENV_BIN / "queen-rbee"), "daemon", "--help"], capture_output=True, text=True, env=proc_env(), timeout=60)
    assert proc.returncode == 0
    assert "--port" in proc.stdout and "--api-key" in proc.stdout and "queen.key" in proc.stdout
    assert "Traceback" not in proc.stderr
