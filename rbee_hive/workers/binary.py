"""Where the worker program for a backend lives.

The resolver is a seam: the default one uses a configured path or the
``llm-worker-rbee`` next to the hive's own Python; a provisioning resolver
(installed worker environments, S5.3) plugs in behind the same interface.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from rbee.errors import RbeeError

WORKER_PROGRAM = "llm-worker-rbee"

Narrate = Callable[..., object]


class WorkerBinaryResolver(Protocol):
    async def resolve(self, backend: str, narrate: Narrate) -> Path:
        """The worker program for ``backend``; raises WORKER_BINARY_NOT_FOUND."""
        ...


def binary_not_found(expected: Path, backend: str) -> RbeeError:
    return RbeeError(
        "WORKER_BINARY_NOT_FOUND",
        f"Worker binary not found: {expected}",
        {"expected_path": str(expected), "backend": backend},
        [
            "Install the worker on this node: rbee-keeper setup install --node NODE "
            "(or `make setup` in the rbee checkout on the node)",
            "Or point RBEE_HIVE_WORKER_BINARY (worker_binary in the [hive] config section) at llm-worker-rbee",
        ],
    )


def default_worker_path() -> Path:
    """``llm-worker-rbee`` in the bin folder of the Python running the hive.
    Not resolved through symlinks: a venv's python links to the system one."""
    return Path(sys.executable).parent / WORKER_PROGRAM


class ConfiguredBinaryResolver:
    """The configured program, else the one installed beside the hive."""

    def __init__(self, configured: Path | None = None) -> None:
        self._configured = Path(configured).expanduser() if configured else None

    def expected(self) -> Path:
        return self._configured or default_worker_path()

    async def resolve(self, backend: str, narrate: Narrate) -> Path:
        path = self.expected()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise binary_not_found(path, backend)
        return path
