"""The queen's API key (S10, S13): where the queen takes it from
(``QueenSettings.api_key_value``) and where a keeper finds it
(``resolve_queen_key``). A local user never handles it: the queen writes it to
$RBEE_HOME/queen.key (0600) and a keeper of the same user reads it there."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee_keeper.queen_client import resolve_queen_key
from rbee_queen.settings import QueenSettings, load_settings

ADDRESS = "127.0.0.1:7800"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private RBEE_HOME and config file; no key in the environment
    (monkeypatch restores every variable afterwards)."""
    home = tmp_path / "rbee-home"
    config = tmp_path / "config.toml"
    config.write_text("")
    monkeypatch.setenv("RBEE_HOME", str(home))
    monkeypatch.setenv("RBEE_CONFIG", str(config))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for name in ("RBEE_QUEEN_API_KEY", "RBEE_QUEEN_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the queen ------------------------------------------------------------------------------


def test_without_a_key_the_queen_generates_one_owner_only_and_reuses_it(env: Path) -> None:
    key, source = load_settings().api_key_value()
    key_file = env / "queen.key"
    assert source == f"{key_file} (generated)"
    assert key_file.read_text() == key + "\n" and len(key) >= 32
    assert mode(key_file) == 0o600 and mode(env) == 0o700

    again, source = load_settings().api_key_value()  # the next start
    assert again == key and source == str(key_file)


def test_a_key_file_others_can_read_is_refused(env: Path) -> None:
    load_settings().api_key_value()
    key_file = env / "queen.key"
    key_file.chmod(0o640)
    with pytest.raises(RbeeError) as caught:
        load_settings().api_key_value()
    err = caught.value
    assert err.code == "INVALID_API_KEY" and "readable by other users" in err.message and "640" in err.message
    assert any(f"chmod 600 {key_file}" in s for s in err.suggestions)


def test_a_configured_key_wins_and_no_file_is_written(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_QUEEN_API_KEY", "from-the-environment")
    assert load_settings().api_key_value() == ("from-the-environment", "configured")
    assert load_settings(api_key="from-the-flag").api_key_value() == ("from-the-flag", "configured")
    assert not (env / "queen.key").exists()


def test_the_config_files_queen_section_sets_the_key(env: Path, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[queen]\napi_key = "from-the-config"\n')
    (tmp_path / "config.toml").chmod(0o600)
    assert QueenSettings().api_key_value() == ("from-the-config", "configured")


# -- the keeper -----------------------------------------------------------------------------


def test_the_keeper_looks_for_the_key_flag_then_env_then_config_then_the_queens_file(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queen_key, _ = load_settings().api_key_value()  # a local queen wrote $RBEE_HOME/queen.key
    assert resolve_queen_key(None, ADDRESS) == (queen_key, str(env / "queen.key"))

    config = tmp_path / "config.toml"
    config.write_text('[keeper]\nqueen_api_key = "from-the-config"\n')
    config.chmod(0o600)
    assert resolve_queen_key(None, ADDRESS) == ("from-the-config", f"{config} [keeper] queen_api_key")

    monkeypatch.setenv("RBEE_QUEEN_API_KEY", "from-the-environment")
    assert resolve_queen_key(None, ADDRESS) == ("from-the-environment", "RBEE_QUEEN_API_KEY")

    assert resolve_queen_key("from-the-flag", ADDRESS) == ("from-the-flag", "--api-key")


def test_the_hives_key_settings_are_not_taken_for_the_queens(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_API_KEY", "a-hive-key")
    (tmp_path / "config.toml").write_text('[keeper]\napi_key = "a-hive-key"\n')
    (tmp_path / "config.toml").chmod(0o600)
    with pytest.raises(RbeeError) as caught:
        resolve_queen_key(None, ADDRESS)
    assert caught.value.code == "MISSING_API_KEY"


def test_no_key_anywhere_says_where_the_keeper_looked(env: Path) -> None:
    with pytest.raises(RbeeError) as caught:
        resolve_queen_key(None, ADDRESS)
    err = caught.value
    assert err.code == "MISSING_API_KEY" and ADDRESS in err.message
    looked = err.details["looked_in"]
    for place in ("--api-key", "RBEE_QUEEN_API_KEY", "[keeper] queen_api_key", str(env / "queen.key")):
        assert place in looked
    assert any("queen-rbee daemon" in s for s in err.suggestions)


def test_the_keeper_refuses_a_queen_key_file_others_can_read(env: Path) -> None:
    load_settings().api_key_value()
    (env / "queen.key").chmod(0o644)
    with pytest.raises(RbeeError) as caught:
        resolve_queen_key(None, ADDRESS)
    assert caught.value.code == "INVALID_API_KEY"
