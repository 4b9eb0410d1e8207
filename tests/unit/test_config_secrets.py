"""A key in a config file that other users can read is refused, as a key file
of the same mode is (it was accepted silently): INVALID_CONFIG naming the
file, the keys and the chmod line, from the keeper's settings and from every
daemon's [section]. A config file without secrets may stay world-readable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from rbee.config import is_secret_setting, keeper_settings, load_config
from rbee.errors import RbeeError
from rbee_hive.settings import HiveSettings
from rbee_queen.settings import QueenSettings
from tests.fixtures.common import VENV_BIN
from tests.fixtures.keeper import keeper_env


def config(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
@pytest.mark.parametrize(
    "text, key",
    [('[keeper]\napi_key = "k"\n', "[keeper] api_key"), ('[keeper]\nqueen_api_key = "k"\n', "[keeper] queen_api_key"),
     ('[hive]\napi_key = "k"\n', "[hive] api_key"), ('[queen]\napi_key = "k"\n', "[queen] api_key")],
)  # fmt: skip
def test_a_secret_in_a_file_others_can_read_is_refused(tmp_path: Path, text: str, key: str, mode: int) -> None:
    path = config(tmp_path, text, mode)
    with pytest.raises(RbeeError) as caught:
        load_config({"RBEE_CONFIG": str(path)})
    err = caught.value
    assert err.code == "INVALID_CONFIG" and key in err.message and f"mode {mode:03o}" in err.message
    assert f"chmod 600 {path}" in err.suggestions[0]


def test_the_same_file_0600_is_read(tmp_path: Path) -> None:
    path = config(tmp_path, '[keeper]\napi_key = "k"\nqueen = "127.0.0.1:7800"\n', 0o600)
    assert keeper_settings({"RBEE_CONFIG": str(path)}).api_key == "k"


def test_a_file_without_secrets_may_be_world_readable(tmp_path: Path) -> None:
    path = config(tmp_path, '[keeper]\nqueen = "127.0.0.1:7800"\napi_key = ""\n', 0o644)
    assert keeper_settings({"RBEE_CONFIG": str(path)}).queen == "127.0.0.1:7800"


@pytest.mark.parametrize("cls", [HiveSettings, QueenSettings])
def test_every_secret_setting_of_the_daemons_is_checked(cls) -> None:
    secret = [name for name, field in cls.model_fields.items() if field.annotation in (SecretStr, SecretStr | None)]
    assert secret and all(is_secret_setting(name) for name in secret)


def test_the_keeper_refuses_it(tmp_path: Path) -> None:
    path = config(tmp_path, '[keeper]\napi_key = "secret-in-a-644-file"\n', 0o644)
    env = keeper_env(tmp_path / "k", RBEE_CONFIG=str(path))
    done = subprocess.run([str(VENV_BIN / "rbee-keeper"), "workers", "list", "--hive", "127.0.0.1:9"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "INVALID_CONFIG" in done.stderr and "chmod 600" in done.stderr, done.stderr
    assert "secret-in-a-644-file" not in done.stderr + done.stdout
