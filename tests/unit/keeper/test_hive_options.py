"""The commands that reach a hive share one --hive and one --api-key: the
same help, the same default (the hive on this machine), the same checks."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.keeper import keeper_help

KEEPER = str(VENV_BIN / "rbee-keeper")
HIVE_COMMANDS = [
    ["workers", "health"], ["workers", "shutdown"], ["workers", "spawn"],
    ["workers", "envs"], ["workers", "provision"],
    ["models", "list"], ["models", "download"], ["models", "rm"], ["logs"],
]


def keeper(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = proc_env(COLUMNS="200", HOME="/nonexistent", **env)
    environment.pop("RBEE_API_KEY", None)
    environment.pop("RBEE_CONFIG", None)
    return subprocess.run([KEEPER, *args], capture_output=True, text=True, env=environment, timeout=60)


@pytest.mark.parametrize("command", HIVE_COMMANDS, ids=" ".join)
def test_help_shows_the_shared_options(command):
    out = keeper_help(*command)
    assert "--hive" in out and "HOST:PORT" in out and "for direct use without a queen" in out
    assert "else 127.0.0.1:7900" in out
    # A machine is named by --node (through the queen), the queen by --queen.
    assert "--node" in out and "by its name at the queen" in out and "--queen" in out
    # The brackets survive rich markup.
    assert "[keeper] api_key" in out and "[keeper] node" in out


@pytest.mark.parametrize("command", [["workers", "list"], ["models", "list"], ["logs"]], ids=" ".join)
def test_a_bad_hive_is_refused_before_anything_is_sent(command):
    proc = keeper(*command, "--hive", "127.0.0.1:http", "--api-key", "k")
    assert proc.returncode == 1
    assert "❌ INVALID_ARGUMENT: --hive has no valid port (1-65535) (got '127.0.0.1:http')" in proc.stderr
    assert "option: --hive" in proc.stderr and "e.g. --hive 127.0.0.1:7900" in proc.stderr
    assert "UNREACHABLE" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["workers", "list"], ["models", "list"], ["logs"]], ids=" ".join)
def test_no_hive_listening_is_a_connection_timeout_after_three_attempts(command):
    # Port 9 (discard) on loopback has nothing listening.
    proc = keeper(*command, "--hive", "127.0.0.1:9", "--api-key", "k")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "❌ CONNECTION_TIMEOUT: Cannot reach the hive at 127.0.0.1:9 after 3 attempts" in proc.stderr
    assert "attempt 2 of 3" in proc.stderr and "attempt 3 of 3" in proc.stderr
    assert "rbee-hive daemon --port 9" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_key_names_the_default_hive():
    proc = keeper("models", "list")
    assert proc.returncode == 1
    assert "❌ MISSING_API_KEY: No API key for 127.0.0.1:7900" in proc.stderr


def test_model_help_keeps_its_brackets():
    assert "hf:ORG/REPO[/FILE][@REVISION]" in keeper_help("models", "download")
