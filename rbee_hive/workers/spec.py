"""What a spawn asks for (SpawnSpec, with the bounds of its own fields) and what
a stop answers (StopResult)."""

from __future__ import annotations

from dataclasses import dataclass

from rbee.config import MAX_SLOTS
from rbee.errors import RbeeError


@dataclass(frozen=True)
class SpawnSpec:
    model_path: str
    backend: str
    device: int
    model_ref: str = ""
    slots: int = 0
    worker_api_key: str = ""


def check_spawn_fields(spec: SpawnSpec) -> None:
    """Bounds of the request's own fields; INVALID_ARGUMENT naming the field."""
    if not 0 <= spec.slots <= MAX_SLOTS:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"slots must be between 1 and {MAX_SLOTS} (0 = the worker's default), got {spec.slots}",
            {"field": "slots", "max": MAX_SLOTS},
            [f"Ask for at most {MAX_SLOTS} slots; start more workers for more concurrency"],
        )
    key = spec.worker_api_key
    if key and (len(key) > 512 or not key.isprintable() or key != key.strip()):
        raise RbeeError(
            "INVALID_ARGUMENT",
            "worker_api_key must be printable text without surrounding spaces, at most 512 characters",
            {"field": "worker_api_key"},
        )


@dataclass(frozen=True)
class StopResult:
    worker_id: str
    force_killed: bool
    exit_code: int
