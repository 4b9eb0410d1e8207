"""Where state lives and where configuration comes from.

Nothing is read from the environment at import time: call the functions.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from rbee.errors import RbeeError

DEFAULT_QUEEN_PORT = 7800
DEFAULT_HIVE_PORT = 7900
DEFAULT_WORKER_PORT_START = 7910
DEFAULT_WORKER_PORT_END = 7999
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Request slots one worker may have (hive spawn, worker flag, keeper option):
# far beyond what one engine batches well, and a bound on what a request can ask.
MAX_SLOTS = 256
VERSION = "0.1.0"
API_VERSION = "v1"
# Hives a queen of this version works with (S4.2): the same API version and a
# program version meeting this requirement.
HIVE_VERSION_REQUIREMENT = ">=0.1.0,<0.2"


def rbee_home(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("RBEE_HOME") or Path.home() / ".rbee").expanduser()


def models_dir(env: dict[str, str] | None = None) -> Path:
    return rbee_home(env) / "models"


def logs_dir(env: dict[str, str] | None = None) -> Path:
    return rbee_home(env) / "logs"


def default_model_path(env: dict[str, str] | None = None) -> Path:
    return models_dir(env) / DEFAULT_MODEL_NAME


def config_candidates(env: dict[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    out = []
    if env.get("RBEE_CONFIG"):
        out.append(Path(env["RBEE_CONFIG"]).expanduser())
    out.append(Path.home() / ".config" / "rbee" / "config.toml")
    out.append(Path("/etc/rbee/config.toml"))
    return out


def load_config(env: dict[str, str] | None = None) -> tuple[dict[str, Any], Path | None]:
    """The first config file found (RBEE_CONFIG, then user, then system)."""
    env = os.environ if env is None else env
    for path in config_candidates(env):
        if path.is_file():
            try:
                return tomllib.loads(path.read_text()), path
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise RbeeError(
                    "INVALID_ARGUMENT",
                    f"Cannot read config file {path}: {exc}",
                    {"path": str(path)},
                    ["Fix the TOML syntax or point RBEE_CONFIG at another file"],
                ) from exc
        if env.get("RBEE_CONFIG") and path == Path(env["RBEE_CONFIG"]).expanduser():
            raise RbeeError(
                "NOT_FOUND",
                f"Config file not found: {path} (from RBEE_CONFIG)",
                {"path": str(path)},
                ["Unset RBEE_CONFIG or create the file"],
            )
    return {}, None
