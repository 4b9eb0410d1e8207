"""Where the daemons take their keys from (S13): environment or a 0600 file;
a worker's admin key comes from its hive through the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee_worker.settings import build_parser, settings_from


def key_file(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    os.chmod(path, mode)
    return path


def worker_settings(tmp_path: Path, *flags: str, **env: str):
    args = build_parser().parse_args(["--model", str(tmp_path), "--port", "0", *flags])
    return settings_from(args, env)


def test_the_worker_takes_its_admin_key_from_the_hive_environment(tmp_path):
    s = worker_settings(tmp_path, RBEE_WORKER_API_KEY="inference", RBEE_WORKER_ADMIN_KEY="admin")
    assert (s.api_key, s.admin_key) == ("inference", "admin")
    # Started by hand without one: the inference key opens Shutdown too (documented).
    assert worker_settings(tmp_path, RBEE_WORKER_API_KEY="inference").admin_key == ""


def test_the_worker_reads_its_key_from_a_private_file_only(tmp_path):
    path = key_file(tmp_path / "worker.key", "from-file")
    assert worker_settings(tmp_path, "--api-key-file", str(path)).api_key == "from-file"
    assert worker_settings(tmp_path, RBEE_WORKER_API_KEY_FILE=str(path)).api_key == "from-file"
    key_file(path, "from-file", 0o644)
    with pytest.raises(RbeeError) as exc:
        worker_settings(tmp_path, "--api-key-file", str(path))
    assert exc.value.code == "INVALID_API_KEY" and "chmod 600" in exc.value.suggestions[0]


def test_the_queen_reads_its_key_from_a_private_file(tmp_path):
    from rbee_queen.settings import QueenSettings

    path = key_file(tmp_path / "q.key", "queen-from-file")
    settings = QueenSettings(home=tmp_path / "home", api_key_file=path)
    assert settings.api_key_value() == ("queen-from-file", str(path))
    assert not (tmp_path / "home" / "queen.key").exists()
