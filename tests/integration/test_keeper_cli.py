"""The installed `rbee-keeper` program as users and scripts meet it (S11):
config precedence (flag > environment > file, RBEE_CONFIG > the user's file),
a bad config file named with its key, --quiet, no colour off a terminal,
`install` into a temporary HOME twice, `install --system` refused without
permission, `status --json` against a real queen. Every run is a subprocess
with its own HOME; nothing here writes outside tmp_path."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.keeper import keeper_help
from tests.fixtures.ports import free_port

KEEPER = str(VENV_BIN / "rbee-keeper")


def keeper(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = proc_env(HOME=str(home), RBEE_HOME=str(home / ".rbee"), NO_COLOR="", COLUMNS="200")
    for name in ("RBEE_CONFIG", "RBEE_API_KEY", "RBEE_QUEEN_API_KEY", "RBEE_NODE", "RBEE_QUEEN", "RBEE_HIVE", "RBEE_TLS",
                 "_RBEE_KEEPER_COMPLETE"):  # fmt: skip
        environment.pop(name, None)
    environment.update(env)
    return subprocess.run([KEEPER, *args], capture_output=True, text=True, env=environment, timeout=120)


def user_config(home: Path, text: str) -> Path:
    path = home / ".config" / "rbee" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)  # it may hold a key: rbee refuses one other users can read
    return path


def queen_tried(proc: subprocess.CompletedProcess) -> str:
    """The queen address a failed command tried (nothing listens on it)."""
    assert proc.returncode == 1, proc.stderr
    line = next(l for l in proc.stderr.splitlines() if "CONNECTION_TIMEOUT" in l)
    return line.split(" at ")[1].split(" ")[0]


def test_config_precedence_flag_over_environment_over_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    from_user, from_env_file, from_env, from_flag = (f"127.0.0.1:{free_port()}" for _ in range(4))
    user_config(home, f'[keeper]\nqueen = "{from_user}"\nqueen_api_key = "k"\n')
    assert queen_tried(keeper(home, "setup", "list-nodes")) == from_user
    # RBEE_CONFIG beats the user's file.
    other = tmp_path / "other.toml"
    other.write_text(f'[keeper]\nqueen = "{from_env_file}"\nqueen_api_key = "k"\n')
    other.chmod(0o600)
    assert queen_tried(keeper(home, "setup", "list-nodes", RBEE_CONFIG=str(other))) == from_env_file
    # The environment beats the file.
    assert queen_tried(keeper(home, "setup", "list-nodes", RBEE_QUEEN=from_env)) == from_env
    # The flag beats the environment.
    assert queen_tried(keeper(home, "setup", "list-nodes", "--queen", from_flag, RBEE_QUEEN=from_env)) == from_flag


def test_where_the_key_came_from_follows_the_same_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = user_config(home, '[keeper]\napi_key = "from-file"\n')
    proc = keeper(home, "--verbose", "models", "list", "--hive", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and "CONNECTION_TIMEOUT" in proc.stderr
    proc = keeper(home, "infer", "--worker", "127.0.0.1:1", "--prompt", "hi", "--max-tokens", "1")
    assert proc.returncode == 1 and "from-file" not in proc.stderr
    assert path.is_file()


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[keeper]\nnode = 3\n", "[keeper] node", "a string"),
        ('[keeper]\nnodes = "x"\n', "[keeper] nodes", "one of the known keys"),
        ('[remote]\nrepo_dir = "relative/path"\n', "[remote] repo_dir", "an absolute path on the nodes"),
        ('[keeper]\nqueen = "no-port"\n', "[keeper] queen", "HOST:PORT"),
        ("[keeper\nnode = 'x'\n", "", "TOML"),
    ],
)
def test_a_bad_config_file_names_the_file_the_key_and_what_was_expected(tmp_path: Path, text, key, expected) -> None:
    home = tmp_path / "home"
    path = user_config(home, text)
    proc = keeper(home, "models", "list", "--hive", "127.0.0.1:9", "--api-key", "k")
    assert proc.returncode == 1 and proc.stdout == ""
    assert str(path) in proc.stderr and key in proc.stderr and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_quiet_leaves_only_the_error_and_no_colour_off_a_terminal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    loud = keeper(home, "models", "list", "--hive", f"127.0.0.1:{port}", "--api-key", "k")
    quiet = keeper(home, "--quiet", "models", "list", "--hive", f"127.0.0.1:{port}", "--api-key", "k")
    assert "did not answer" in loud.stderr and "did not answer" not in quiet.stderr
    assert quiet.returncode == 1 and "❌ CONNECTION_TIMEOUT" in quiet.stderr
    for proc in (loud, quiet):
        assert "\x1b[" not in proc.stderr + proc.stdout  # pipes get no escape codes


def test_help_documents_the_precedence_and_each_command_has_an_example() -> None:
    # In this process: the console script's own --help runs in keeper_cli.feature.
    out = keeper_help()
    assert "beats the environment, which beats the config file" in out and "[keeper]" in out and "[remote]" in out
    commands = [["infer"], ["status"], ["install"], ["logs"]]
    commands += [["models", c] for c in ("list", "download", "rm")]
    commands += [["workers", c] for c in ("list", "health", "shutdown", "spawn", "envs", "provision")]
    commands += [["setup", c] for c in ("add-node", "update-node", "remove-node", "list-nodes", "install", "check-node")]
    commands += [["keys", c] for c in ("create", "list", "revoke")]
    for command in commands:
        assert "Example: rbee-keeper" in keeper_help(*command), command


def test_install_into_a_temporary_home_twice(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = keeper(home, "install")
    assert first.returncode == 0, first.stderr
    bin_dir, config = home / ".local" / "bin", home / ".config" / "rbee" / "config.toml"
    for name in ("rbee-keeper", "queen-rbee", "rbee-hive", "llm-worker-rbee"):
        assert (bin_dir / name).is_symlink() and os.access(bin_dir / name, os.X_OK)
    assert (home / ".local" / "share" / "rbee" / "models").is_dir() and config.is_file()
    assert f"Wrote the default config file {config}" in first.stderr and "Linked" in first.stderr
    # The default file is valid: a command reads it without complaint.
    assert "INVALID_CONFIG" not in keeper(home, "models", "list", "--hive", "127.0.0.1:9", "--api-key", "k").stderr
    # Twice is harmless, and an existing config file is never overwritten.
    config.write_text('[keeper]\nnode = "mine"\n')
    second = keeper(home, "install")
    assert second.returncode == 0, second.stderr
    assert config.read_text() == '[keeper]\nnode = "mine"\n'
    assert f"Kept the existing config file {config}" in second.stderr and "already links to" in second.stderr
    # The installed program runs.
    assert subprocess.run([str(bin_dir / "rbee-keeper"), "--version"], capture_output=True, text=True).stdout.startswith("rbee-keeper ")


def _demoter() -> list[str] | None:
    """A command prefix that runs a program as the unprivileged user nobody, when we are root."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def test_system_install_without_permission_fails_with_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    env = proc_env(HOME="/nonexistent", NO_COLOR="1")
    env.pop("RBEE_CONFIG", None)
    demote = _demoter()
    if demote is None:
        # Not root: an unwritable prefix is the same refusal.
        root.chmod(0o555)
        demote = []
    proc = subprocess.run([*demote, KEEPER, "install", "--system", "--prefix", str(root)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "❌ ACCESS_DENIED: Cannot write" in proc.stderr and "not writable by" in proc.stderr and "Traceback" not in proc.stderr
    assert "(a system install needs root)" in proc.stderr and "sudo rbee-keeper install --system" in proc.stderr
    assert not any(root.iterdir())  # nothing was half done


def test_completion_script_is_available(tmp_path: Path) -> None:
    proc = keeper(tmp_path / "home", "--show-completion", "bash", SHELL="/bin/bash")
    assert proc.returncode == 0 and "rbee-keeper" in proc.stdout.lower() or "_RBEE_KEEPER_COMPLETE" in proc.stdout, proc
