"""The hive's settings: one class, env prefix RBEE_HIVE_, typed durations.

Precedence: command-line values (passed as keyword arguments) over the
environment over the ``[hive]`` section of the config file over defaults.
Nothing is read at import time; the sources are read when the class is built.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import re

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rbee.config import DEFAULT_HIVE_PORT, DEFAULT_WORKER_PORT_END, DEFAULT_WORKER_PORT_START, load_config, rbee_home
from rbee.errors import RbeeError


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Any) -> Any:
    """Seconds as a number or text ("2.5"), or with a unit ("500ms", "30s", "5m", "1h").
    Anything else is left to pydantic (ISO 8601 "PT30S", timedelta)."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])
    return value


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The ``[hive]`` table of the config file (RBEE_CONFIG → user → system)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        config, _ = load_config()
        section = config.get("hive") or {}
        return {k: v for k, v in section.items() if k in self.settings_cls.model_fields}


class HiveSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RBEE_HIVE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_HIVE_PORT, ge=0, le=65535)
    # Required to run the daemon; never logged.
    api_key: SecretStr | None = None
    # RBEE_HOME for logs and the model store; None = RBEE_HOME / ~/.rbee.
    home: Path | None = None

    # Workers
    worker_host: str = "127.0.0.1"
    worker_port_start: int = Field(DEFAULT_WORKER_PORT_START, ge=1, le=65535)
    worker_port_end: int = Field(DEFAULT_WORKER_PORT_END, ge=1, le=65535)
    # The worker program; None = llm-worker-rbee next to the hive's Python.
    worker_binary: Path | None = None
    # A worker that exits within this window after its start failed to start (S7).
    startup_window: timedelta = timedelta(seconds=30)
    # How long a spawn waits for the worker's first callback (its server is up).
    callback_timeout: timedelta = timedelta(seconds=120)

    # Supervision (S8)
    health_interval: timedelta = timedelta(seconds=30)
    health_timeout: timedelta = timedelta(seconds=5)
    health_failures: int = Field(3, ge=1)
    idle_timeout: timedelta = timedelta(minutes=5)
    # How long a worker may take to exit after Shutdown before it is force-killed.
    shutdown_grace: timedelta = timedelta(seconds=30)
    # After SIGTERM/SIGKILL of a process tree, how long to wait for it to go.
    kill_wait: timedelta = timedelta(seconds=5)

    # Operator/test override of the resource figures (a JSON file, read on
    # every query). Leave unset in normal operation.
    resource_overrides: Path | None = None

    @field_validator(
        "startup_window", "callback_timeout", "health_interval", "health_timeout", "idle_timeout",
        "shutdown_grace", "kill_wait", mode="before",
    )  # fmt: skip
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @model_validator(mode="after")
    def _check_range(self) -> "HiveSettings":
        if self.worker_port_end < self.worker_port_start:
            raise ValueError(
                f"worker_port_end ({self.worker_port_end}) is below worker_port_start ({self.worker_port_start})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))

    @property
    def rbee_home(self) -> Path:
        return self.home.expanduser() if self.home else rbee_home()

    @property
    def logs_dir(self) -> Path:
        return self.rbee_home / "logs"

    @property
    def models_dir(self) -> Path:
        return self.rbee_home / "models"

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


def load_settings(**overrides: Any) -> HiveSettings:
    """Settings from every source; ``overrides`` (command-line values) win.
    Bad values become an INVALID_ARGUMENT error naming the setting."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return HiveSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid hive setting {name}: {first.get('msg')}",
            {"setting": name, "env": f"RBEE_HIVE_{name.upper()}"},
            ["Fix the command-line option, the RBEE_HIVE_* variable or the [hive] section of the config file"],
        ) from None
