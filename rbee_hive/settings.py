"""The hive's settings: one class, env prefix RBEE_HIVE_, typed durations.

Precedence: command-line values (passed as keyword arguments) over the
environment over the ``[hive]`` section of the config file over defaults.
Nothing is read at import time; the sources are read when the class is built.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from rbee.config import DEFAULT_HIVE_PORT, DEFAULT_WORKER_PORT_END, DEFAULT_WORKER_PORT_START
from rbee.auth import read_key_file
from rbee.errors import RbeeError
from rbee.client_version import MIN_KEEPER_VERSION, valid_version
from rbee.settings import DaemonSettings, build_settings, parse_duration

if TYPE_CHECKING:
    from rbee.tls import TlsIdentity




class HiveSettings(DaemonSettings):
    config_section: ClassVar[str] = "hive"
    model_config = SettingsConfigDict(env_prefix="RBEE_HIVE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_HIVE_PORT, ge=0, le=65535)
    # Required to run the daemon; never logged.
    api_key: SecretStr | None = None
    # A file holding the key (mode 0600): how the queen hands a hive its key,
    # keeping it out of argv and the environment. Used when api_key is unset.
    api_key_file: Path | None = None

    # Mutual TLS (S13): the hive's certificate chain and key, the cluster CA
    # its clients and workers chain to, and the issuing certificate and key it
    # signs its workers' certificates with (without one, workers serve with
    # the hive's own certificate). The queen delivers all five to its nodes.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_issuer_cert: Path | None = None
    tls_issuer_key: Path | None = None
    # Listen beyond loopback without TLS (narrated as a warning at start).
    insecure: bool = False

    # Log files under logs/ (the hive's, each worker's): one that would pass
    # log_max_bytes is renamed to NAME.log.1 (older ones to .2 ...), keeping
    # log_backups of them, so logs never fill the disk.
    log_max_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    log_backups: int = Field(2, ge=0, le=100)
    # The file the hive's stdout and stderr were redirected into by whoever
    # started it (the queen: logs/hive.log); rotated the same way.
    stdout_log: Path | None = None

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

    # WatchWorkers (the queen's view of this hive): a heartbeat this often
    # while nothing changes.
    watch_heartbeat: timedelta = timedelta(seconds=10)

    # Supervision (S8)
    health_interval: timedelta = timedelta(seconds=30)
    health_timeout: timedelta = timedelta(seconds=5)
    health_failures: int = Field(3, ge=1)
    idle_timeout: timedelta = timedelta(minutes=5)

    # The oldest rbee-keeper served directly (rbee/client_version.py).
    min_keeper_version: str = MIN_KEEPER_VERSION
    # How long a worker may take to exit after Shutdown before it is force-killed.
    shutdown_grace: timedelta = timedelta(seconds=30)
    # After SIGTERM/SIGKILL of a process tree, how long to wait for it to go.
    kill_wait: timedelta = timedelta(seconds=5)

    # Operator/test override of the resource figures (a JSON file, read on
    # every query). Leave unset in normal operation.
    resource_overrides: Path | None = None

    # Confinement (S13). Folders beyond $RBEE_HOME/models whose models may be
    # registered (file://) and loaded by workers.
    model_dirs: Annotated[list[Path], NoDecode] = []
    # Project sources worker environments may be built from, beyond the
    # hive's own installation (always allowed, and the default).
    worker_sources: Annotated[list[Path], NoDecode] = []
    # Variables passed to workers beyond the ones the engine needs: names, or
    # prefixes ending in '*'. Secrets (*KEY*, *TOKEN*, *SECRET*, ...) never are.
    worker_env: Annotated[list[str], NoDecode] = []
    # The dtype workers run their models in: "auto" lets each worker choose
    # from the hardware (docs/hive.md); float32, bfloat16 or float16 is passed
    # to every worker as --dtype.
    worker_dtype: str = "auto"
    # Cores each CPU worker gets for itself (its CPU affinity); 0 = every core
    # no other worker holds.
    worker_cores: int = Field(0, ge=0)
    # CUDA workers run their engine with vLLM's sleep mode (RBEE_WORKER_SLEEP_MODE=1),
    # so SleepWorker can free their GPU memory while idle (docs/hive.md). Off:
    # sleep mode makes vLLM allocate GPU memory through its own pool.
    worker_sleep_mode: bool = False

    @field_validator("model_dirs", "worker_sources", "worker_env", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # The environment gives one string: entries separated by ':' or ','.
        if isinstance(value, str):
            return [part.strip() for part in value.replace(",", ":").split(":") if part.strip()]
        return value

    @field_validator(
        "startup_window", "callback_timeout", "health_interval", "watch_heartbeat", "health_timeout", "idle_timeout",
        "shutdown_grace", "kill_wait", mode="before",
    )  # fmt: skip
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("min_keeper_version")
    @classmethod
    def _keeper_version(cls, value: str) -> str:
        return valid_version(value)

    @field_validator("worker_dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> Any:
        from rbee.dtype import normalize

        try:
            return normalize(str(value))
        except RbeeError as err:
            raise ValueError(err.message) from None

    @model_validator(mode="after")
    def _check_range(self) -> "HiveSettings":
        if self.worker_port_end < self.worker_port_start:
            raise ValueError(
                f"worker_port_end ({self.worker_port_end}) is below worker_port_start ({self.worker_port_start})"
            )
        return self

    @property
    def models_dir(self) -> Path:
        return self.rbee_home / "models"

    @property
    def model_roots(self) -> list[Path]:
        """Where models may lie: the models folder, then the operator's extra folders."""
        return [self.models_dir, *(p.expanduser() for p in self.model_dirs)]

    def api_key_value(self) -> str | None:
        if self.api_key:
            return self.api_key.get_secret_value()
        if self.api_key_file:
            return read_key_file(self.api_key_file, "api_key_file")
        return None


    def tls_identity(self) -> "TlsIdentity | None":
        """The hive's TLS identity, or None when it serves plain gRPC."""
        from rbee.tls import TlsIdentity

        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        if not (self.tls_cert and self.tls_key and self.tls_ca):
            missing = [f"--{n.replace('_', '-')}" for n in ("tls_cert", "tls_key", "tls_ca") if not getattr(self, n)]
            raise RbeeError(
                "TLS_FILE_INVALID",
                f"TLS needs a certificate, its key and the cluster CA; missing {', '.join(missing)}",
                {"missing": ", ".join(missing)},
                ["Pass --tls-cert, --tls-key and --tls-ca together (or RBEE_HIVE_TLS_CERT, _KEY, _CA)"],
            )
        return TlsIdentity.load(self.tls_cert, self.tls_key, self.tls_ca)


def load_settings(**overrides: Any) -> HiveSettings:
    """Settings from every source; ``overrides`` (command-line values) win.
    Bad values become an INVALID_ARGUMENT error naming the setting."""
    return build_settings(HiveSettings, "RBEE_HIVE_", "hive", "hive", **overrides)
