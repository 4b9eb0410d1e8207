"""What every daemon's settings class shares: durations with units, the
config file's section as a settings source, and validation errors turned into
one clear INVALID_ARGUMENT naming the setting and where it can be fixed."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from rbee.config import load_config, rbee_home
from rbee.errors import RbeeError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")

T = TypeVar("T", bound=BaseSettings)


def parse_duration(value: Any) -> Any:
    """Seconds as a number or text ("2.5"), or with a unit ("500ms", "30s", "5m", "1h").
    Anything else is left to pydantic (ISO 8601 "PT30S", timedelta)."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])
    return value


def config_section_source(section: str) -> type[PydanticBaseSettingsSource]:
    """A settings source reading ``[section]`` of the config file (RBEE_CONFIG → user → system)."""

    class _ConfigFileSource(PydanticBaseSettingsSource):
        def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
            return None, field_name, False

        def __call__(self) -> dict[str, Any]:
            config, _ = load_config()
            values = config.get(section) or {}
            return {k: v for k, v in values.items() if k in self.settings_cls.model_fields}

    _ConfigFileSource.__name__ = f"ConfigFile_{section}"
    return _ConfigFileSource


def build_settings(cls: type[T], env_prefix: str, section: str, program: str, **overrides: Any) -> T:
    """``cls`` from every source; ``overrides`` (command-line values, None = not given) win.
    Bad values become an INVALID_ARGUMENT error naming the setting."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid {program} setting {name}: {first.get('msg')}",
            {"setting": name, "env": f"{env_prefix}{name.upper()}"},
            [f"Fix the command-line option, the {env_prefix}* variable or the [{section}] section of the config file"],
        ) from None


class DaemonSettings(BaseSettings):
    """A daemon's settings: keyword arguments (the command line) over the
    environment over the ``[SECTION]`` table of the config file; ``home``
    (RBEE_HOME) with its logs folder. Subclasses set ``config_section``."""

    config_section: ClassVar[str] = ""
    # RBEE_HOME; None = RBEE_HOME from the environment, else ~/.rbee.
    home: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, config_section_source(cls.config_section)(settings_cls))

    @property
    def rbee_home(self) -> Path:
        return self.home.expanduser() if self.home else rbee_home()

    @property
    def logs_dir(self) -> Path:
        return self.rbee_home / "logs"
