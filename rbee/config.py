"""Where state lives and where configuration comes from.

Nothing is read from the environment at import time: call the functions.
Kept light (no gRPC, no pydantic): every keeper command imports it, even
``--version``; errors are imported where they are raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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
    import tomllib

    from rbee.errors import RbeeError

    env = os.environ if env is None else env
    for path in config_candidates(env):
        try:
            found = path.is_file()
        except OSError:  # a folder on the way is not ours to look into
            found = False
        if found:
            try:
                config = tomllib.loads(path.read_text())
                mode = path.stat().st_mode & 0o777
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise RbeeError(
                    "INVALID_ARGUMENT",
                    f"Cannot read config file {path}: {exc}",
                    {"path": str(path)},
                    ["Fix the TOML syntax or point RBEE_CONFIG at another file"],
                ) from exc
            _check_secrets_private(config, path, mode)
            return config, path
        if env.get("RBEE_CONFIG") and path == Path(env["RBEE_CONFIG"]).expanduser():
            raise RbeeError(
                "NOT_FOUND",
                f"Config file not found: {path} (from RBEE_CONFIG)",
                {"path": str(path)},
                ["Unset RBEE_CONFIG or create the file"],
            )
    return {}, None


# Settings whose value is a secret (an API key, a token): a config file that
# holds one must be as private as a key file (rbee/auth.py read_key_file).
SECRET_SUFFIXES = ("api_key", "token", "secret", "password")


def is_secret_setting(name: str) -> bool:
    return name.lower().endswith(SECRET_SUFFIXES)


def _check_secrets_private(config: dict[str, Any], path: Path, mode: int) -> None:
    if not mode & 0o077:
        return
    secrets = [f"[{section}] {key}" for section, values in config.items() if isinstance(values, dict)
               for key, value in values.items() if is_secret_setting(key) and value]  # fmt: skip
    if not secrets:
        return
    from rbee.errors import RbeeError

    raise RbeeError(
        "INVALID_CONFIG",
        f"Config file {path} holds a secret ({', '.join(secrets)}) and is readable by other users (mode {mode:03o})",
        {"file": str(path), "mode": f"{mode:03o}", "keys": ", ".join(secrets)},
        [f"Run `chmod 600 {path}`", "Or keep the key in a file of its own (mode 600) or the environment"],
    )


# -- the keeper's settings ---------------------------------------------------------------

TLS_MODES = ("", "auto", "on", "off")

KEEPER_ENV = {
    "node": "RBEE_NODE",
    "queen": "RBEE_QUEEN",
    "hive": "RBEE_HIVE",
    "api_key": "RBEE_API_KEY",
    "queen_api_key": "RBEE_QUEEN_API_KEY",
    "tls": "RBEE_TLS",
}


@dataclass(frozen=True)
class RemoteSettings:
    """``[remote]``: where rbee lives on nodes that do not say so themselves."""

    # The hive program on a node (absolute), e.g. /opt/rbee/.venv/bin/rbee-hive.
    hive_program: str = ""
    # The repository folder on a node (absolute): setup install clones there.
    repo_dir: str = ""


@dataclass(frozen=True)
class KeeperSettings:
    """What the keeper's commands take from the environment and ``[keeper]``;
    a command-line option beats both (flag > environment > file)."""

    # The node meant when a command is given neither --node nor --hive/--worker.
    node: str = ""
    # The queen as HOST:PORT ("" = 127.0.0.1:7800).
    queen: str = ""
    # The hive for direct use as HOST:PORT ("" = 127.0.0.1:7900).
    hive: str = ""
    api_key: str = ""
    queen_api_key: str = ""
    # TLS to a daemon the queen has not described (--hive, --worker, the
    # queen): "auto" (or "") = when its address is beyond loopback, "on", "off".
    tls: str = ""
    remote: RemoteSettings = RemoteSettings()
    # The config file read (None = none found) and where each value came from.
    path: Path | None = None
    sources: tuple[tuple[str, str], ...] = ()

    def source(self, name: str) -> str:
        return dict(self.sources).get(name, "default")


_SECTIONS: dict[str, tuple[type, str]] = {"keeper": (KeeperSettings, "keeper"), "remote": (RemoteSettings, "remote")}
_NOT_FROM_FILE = {"remote", "path", "sources"}
# The original design's names for the [remote] keys, accepted as aliases
# (docs/queen.md, "Remote paths").
_ALIASES: dict[str, dict[str, str]] = {"remote": {"binary_path": "hive_program", "git_repo_dir": "repo_dir"}}


def _bad_config(path: Path, key: str, expected: str, got: Any):
    from rbee.errors import RbeeError

    return RbeeError(
        "INVALID_CONFIG",
        f"Config file {path}: {key} must be {expected} (got {got!r})",
        {"file": str(path), "key": key, "expected": expected},
        [f"Fix {key} in {path}, or point RBEE_CONFIG at another file"],
    )


def _section(config: dict[str, Any], path: Path, name: str, cls: type) -> dict[str, str]:
    values = config.get(name, {})
    if not isinstance(values, dict):
        raise _bad_config(path, f"[{name}]", "a table", values)
    known = [f.name for f in fields(cls) if f.name not in _NOT_FROM_FILE]
    aliases = _ALIASES.get(name, {})
    out: dict[str, str] = {}
    for key, value in values.items():
        if key in aliases:
            canonical = aliases[key]
            if canonical in values and values[canonical] != value:
                raise _bad_config(path, f"[{name}] {key}", f"the same as {canonical} (an alias of it), or left out",
                                  value)
        elif key not in known:
            raise _bad_config(path, f"[{name}] {key}", f"one of the known keys ({', '.join([*known, *aliases])})", key)
        if not isinstance(value, str):
            raise _bad_config(path, f"[{name}] {key}", "a string", value)
        if name == "remote" and value and not value.startswith("/"):
            raise _bad_config(path, f"[{name}] {key}", "an absolute path on the nodes", value)
        if key in ("queen", "hive") and value and ":" not in value:
            raise _bad_config(path, f"[{name}] {key}", "HOST:PORT", value)
        if key == "tls" and value not in TLS_MODES:
            raise _bad_config(path, f"[{name}] {key}", f"one of {', '.join(m for m in TLS_MODES if m)}", value)
        out[aliases.get(key, key)] = value
    return out


def keeper_settings(env: dict[str, str] | None = None) -> KeeperSettings:
    """The keeper's settings: environment (RBEE_NODE, RBEE_QUEEN, RBEE_HIVE,
    RBEE_API_KEY, RBEE_QUEEN_API_KEY) over ``[keeper]``/``[remote]`` of the
    config file (RBEE_CONFIG, ~/.config/rbee/config.toml, /etc/rbee/config.toml).
    A bad file is INVALID_CONFIG naming the file, the key and what was expected."""
    env = os.environ if env is None else env
    config, path = load_config(env)
    keeper: dict[str, str] = {}
    remote: dict[str, str] = {}
    sources: dict[str, str] = {}
    if path is not None:
        keeper = _section(config, path, "keeper", KeeperSettings)
        remote = _section(config, path, "remote", RemoteSettings)
        sources.update({k: f"{path} [keeper] {k}" for k in keeper})
    for name, var in KEEPER_ENV.items():
        if env.get(var):
            keeper[name] = env[var]
            sources[name] = var
    return KeeperSettings(**keeper, remote=RemoteSettings(**remote), path=path, sources=tuple(sources.items()))


def remote_settings(env: dict[str, str] | None = None) -> RemoteSettings:
    """``[remote]`` of the config file alone (the queen's defaults for nodes
    registered without their own paths); INVALID_CONFIG when it is bad."""
    config, path = load_config(env)
    if path is None:
        return RemoteSettings()
    return RemoteSettings(**_section(config, path, "remote", RemoteSettings))
