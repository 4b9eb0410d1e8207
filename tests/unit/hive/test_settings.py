from datetime import timedelta

import pytest

from rbee.errors import RbeeError
from rbee_hive.settings import HiveSettings, load_settings


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment for the settings: no RBEE_HIVE_* and an empty config file."""
    import os

    for key in list(os.environ):
        if key.startswith("RBEE_HIVE_"):
            monkeypatch.delenv(key)
    cfg = tmp_path / "config.toml"
    cfg.write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(cfg))
    return cfg


def test_defaults_follow_the_spec(env):
    s = load_settings()
    assert s.port == 7900
    assert (s.worker_port_start, s.worker_port_end) == (7910, 7999)
    assert s.health_interval == timedelta(seconds=30)
    assert s.health_failures == 3
    assert s.idle_timeout == timedelta(minutes=5)
    assert s.shutdown_grace == timedelta(seconds=30)
    assert s.startup_window == timedelta(seconds=30)
    assert s.api_key is None


def test_environment_then_config_file_then_cli(env, monkeypatch):
    env.write_text('[hive]\nidle_timeout = 60\nhealth_failures = 5\nport = 7001\n')
    monkeypatch.setenv("RBEE_HIVE_IDLE_TIMEOUT", "2.5")
    s = load_settings(port=7002)
    assert s.idle_timeout == timedelta(seconds=2.5)  # env beats the file
    assert s.health_failures == 5  # from the file
    assert s.port == 7002  # the command line beats everything


def test_api_key_is_never_shown(env, monkeypatch):
    monkeypatch.setenv("RBEE_HIVE_API_KEY", "sekrit-value")
    s = load_settings()
    assert s.api_key_value() == "sekrit-value"
    assert "sekrit-value" not in repr(s) and "sekrit-value" not in str(s)


def test_bad_values_name_the_setting(env, monkeypatch):
    monkeypatch.setenv("RBEE_HIVE_HEALTH_INTERVAL", "soon")
    with pytest.raises(RbeeError) as exc:
        load_settings()
    assert exc.value.code == "INVALID_ARGUMENT"
    assert exc.value.details["env"] == "RBEE_HIVE_HEALTH_INTERVAL"


def test_port_range_must_be_ordered(env):
    with pytest.raises(RbeeError) as exc:
        load_settings(worker_port_start=8000, worker_port_end=7999)
    assert "worker_port_end" in exc.value.message


def test_home_places_logs_and_models(env, tmp_path):
    s = HiveSettings(home=tmp_path)
    assert s.logs_dir == tmp_path / "logs"
    assert s.models_dir == tmp_path / "models"


@pytest.mark.parametrize(
    "text, seconds", [("2.5", 2.5), ("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("PT45S", 45)]
)
def test_durations_with_units(env, monkeypatch, text, seconds):
    monkeypatch.setenv("RBEE_HIVE_IDLE_TIMEOUT", text)
    assert load_settings().idle_timeout == timedelta(seconds=seconds)
