"""Download settings: read once from the environment when the hive starts.

The hub endpoint, token and offline switch are huggingface_hub's own
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``); the retry figures are S5.2's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class DownloadSettings:
    # None: huggingface_hub's default endpoint.
    endpoint: str | None = None
    offline: bool = False
    # No byte for this long → the attempt is a stall (S5.2: 60 s).
    stall_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    # Retries after the first attempt, waiting base, 2×base, … (100…3200 ms).
    retries: int = 6
    backoff_base_ms: int = 100
    jitter: float = 0.2
    # How often progress is reported while bytes flow.
    progress_interval_s: float = 0.25

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DownloadSettings":
        env = os.environ if env is None else env

        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError as exc:
                raise ValueError(f"{name} must be a number, got {raw!r}") from exc
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {raw!r}")
            return value

        return cls(
            endpoint=(env.get("HF_ENDPOINT") or "").rstrip("/") or None,
            offline=(env.get("HF_HUB_OFFLINE") or "").strip().lower() in _TRUE,
            stall_timeout_s=number("RBEE_DOWNLOAD_STALL_TIMEOUT_S", cls.stall_timeout_s),
            connect_timeout_s=number("RBEE_DOWNLOAD_CONNECT_TIMEOUT_S", cls.connect_timeout_s),
            retries=int(number("RBEE_DOWNLOAD_RETRIES", cls.retries)),
            backoff_base_ms=int(number("RBEE_DOWNLOAD_BACKOFF_MS", cls.backoff_base_ms)),
        )
