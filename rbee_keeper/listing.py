"""Listings the keeper prints: a table for people, or one JSON object per
item for scripts (stdout), with "nothing here" on stderr so stdout stays empty."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from rbee_keeper.render import narrator


def show_listing(
    items: Sequence[Any],
    as_json: bool,
    as_dict: Callable[[Any], dict],
    nothing: str,
    headers: Sequence[str],
    cells: Callable[[Any], Sequence[str]],
) -> int:
    """A listing: one JSON object per item on stdout, or a table; when there is
    nothing, a line on stderr (stdout stays empty for scripts)."""
    if as_json:
        for item in items:
            print(json.dumps(as_dict(item)))
        return 0
    if not items:
        narrator()("📭", nothing)
        return 0
    table = Table(*headers)
    for item in items:
        table.add_row(*cells(item))
    Console(highlight=False, width=200).print(table)
    return 0
