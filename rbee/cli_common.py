"""What every console script shares: turning RbeeError into a clear message
and a stable exit code, never a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console

from rbee.errors import RbeeError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(err: RbeeError, actor: str) -> None:
    stderr.print(f"[{actor}] ❌ {err.code}: {err.message}", markup=False)
    for key, value in err.details.items():
        stderr.print(f"    {key}: {value}", markup=False)
    for suggestion in err.suggestions:
        stderr.print(f"    → {suggestion}", markup=False)


def fail(err: RbeeError, actor: str) -> NoReturn:
    print_error(err, actor)
    sys.exit(EXIT_ERROR)
