"""The queen's settings: one class, env prefix RBEE_QUEEN_, typed durations.

Precedence: command-line values over the environment over the ``[queen]``
section of the config file over defaults. Nothing is read at import time.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from rbee.auth import new_api_key, read_key_file, write_key_file
from rbee.config import DEFAULT_QUEEN_PORT
from rbee.settings import DaemonSettings, build_settings, parse_duration
from rbee.client_version import MIN_KEEPER_VERSION, valid_version
from rbee_queen.hive_minimums import GiB, parse_size

QUEEN_KEY_FILE = "queen.key"
# The original design's queen port, now the HTTP front door's.
DEFAULT_HTTP_PORT = 8080


class QueenSettings(DaemonSettings):
    config_section: ClassVar[str] = "queen"
    model_config = SettingsConfigDict(env_prefix="RBEE_QUEEN_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_QUEEN_PORT, ge=0, le=65535)
    # None = read or create $RBEE_HOME/queen.key (0600). Never logged.
    api_key: SecretStr | None = None
    # A file holding the key (mode 0600), used when api_key is unset.
    api_key_file: Path | None = None
    # Listen beyond loopback without TLS (by default the queen then serves
    # mutual TLS with a certificate of its own cluster CA).
    insecure: bool = False

    # The OpenAI-compatible HTTP front door (docs/openai-api.md): its port
    # (0 = off), its address (default: the gRPC one) and, beyond loopback, a
    # certificate browsers trust (default: one of the cluster CA's).
    http_port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535)
    http_host: str | None = None
    http_cert: Path | None = None
    http_key: Path | None = None
    # How long an HTTP request waits for a cold start before 503 + Retry-After.
    http_cold_start_wait: timedelta = timedelta(seconds=300)
    # GET /metrics without a key (for a Prometheus on a trusted network).
    metrics_public: bool = False
    # The admission queue (docs/queen.md): requests waiting for a busy model's
    # slot, at most this many per model (0 = refuse at once) and this long.
    queue_length: int = Field(64, ge=0, le=10000)
    queue_wait: timedelta = timedelta(seconds=60)

    # Idle memory (docs/queen.md): how long an idle worker stays loaded when
    # neither its request nor its model says ("5m", "30s", seconds; 0 = stop
    # after each request; -1 = never). Seconds here, inf for never.
    keep_alive: float = 300.0
    # Idle sleep: an expired CUDA worker is put to sleep (vLLM's sleep mode,
    # level 1) rather than stopped; others are stopped as before.
    idle_sleep: bool = False

    # SSH (S3): per-attempt connect timeout and attempts.
    ssh_connect_timeout: timedelta = timedelta(seconds=10)
    ssh_attempts: int = Field(3, ge=1, le=10)
    # SSH round trip above this is reported as a warning (S4.1).
    latency_warning: timedelta = timedelta(milliseconds=100)
    # How long a hive started by the queen may take to answer its health check.
    hive_start_timeout: timedelta = timedelta(seconds=30)
    # Workers of a node whose hive has not been heard from this long are
    # dropped from the global registry (S6.2).
    worker_stale_after: timedelta = timedelta(seconds=120)
    # Deployments (docs/queen.md, "Replicas"): how often the reconcile loop
    # looks when nothing changed, and the backoff of a replica's restarts
    # (the first wait, doubled per restart up to the cap).
    replica_interval: timedelta = timedelta(seconds=2)
    replica_backoff_base: timedelta = timedelta(seconds=1)
    replica_backoff_max: timedelta = timedelta(seconds=60)
    # How long one install step may run on a node (an engine install is long).
    install_step_timeout: timedelta = timedelta(minutes=60)
    # On nodes, link the engine from this site-packages folder (a path on the
    # node) instead of installing one, when it holds a matching engine. For
    # nodes that already carry the engine (a shared image, this machine).
    install_engine_site: str | None = None
    # Hive preflight (S4.2): the free RAM and disk a node needs before the
    # queen starts workers of a backend there (rbee_queen/hive_minimums.py
    # says why these figures). Sizes in bytes or with a unit ("3GiB"); 0 = no check.
    hive_min_ram_gpu: int = Field(8 * GiB, ge=0)
    hive_min_disk_gpu: int = Field(50 * GiB, ge=0)
    hive_min_ram_cpu: int = Field(3 * GiB, ge=0)
    hive_min_disk_cpu: int = Field(5 * GiB, ge=0)
    # The oldest rbee-keeper served (rbee/client_version.py): an older one is
    # refused with VERSION_MISMATCH and how to upgrade it.
    min_keeper_version: str = MIN_KEEPER_VERSION

    @field_validator("ssh_connect_timeout", "latency_warning", "hive_start_timeout", "install_step_timeout",
                     "worker_stale_after", "http_cold_start_wait", "queue_wait", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("hive_min_ram_gpu", "hive_min_disk_gpu", "hive_min_ram_cpu", "hive_min_disk_cpu", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)

    @field_validator("min_keeper_version")
    @classmethod
    def _version(cls, value: str) -> str:
        return valid_version(value)

    @field_validator("replica_interval", "replica_backoff_base", "replica_backoff_max", mode="before")
    @classmethod
    def _replica_duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> Any:
        from rbee_queen.keepalive import parse_keep_alive

        seconds = parse_keep_alive(value, "keep_alive")
        return 300.0 if seconds is None else seconds

    @property
    def db_path(self) -> Path:
        return self.rbee_home / "beehives.db"

    @property
    def known_hosts(self) -> Path:
        """The queen's own known_hosts: where --trust-host-key records keys."""
        return self.rbee_home / "known_hosts"

    @property
    def key_file(self) -> Path:
        return self.rbee_home / QUEEN_KEY_FILE

    def api_key_value(self) -> tuple[str, str]:
        """The key clients must present and where it came from. Without a
        configured key, $RBEE_HOME/queen.key is read, or created (0600) so a
        keeper of the same user on this machine finds it there."""
        if self.api_key:
            return self.api_key.get_secret_value(), "configured"
        if self.api_key_file:
            return read_key_file(self.api_key_file, "api_key_file"), str(self.api_key_file)
        if self.key_file.exists():
            return read_key_file(self.key_file, "queen.key"), str(self.key_file)
        key = new_api_key()
        write_key_file(self.key_file, key)
        return key, f"{self.key_file} (generated)"


def load_settings(**overrides: Any) -> QueenSettings:
    return build_settings(QueenSettings, "RBEE_QUEEN_", "queen", "queen", **overrides)
