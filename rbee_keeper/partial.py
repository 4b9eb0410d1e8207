"""Keeping what was generated when a stream breaks (S9).

The text goes to ``$RBEE_HOME/partial/<UTC time>-<request id>.partial.txt``;
when that folder cannot be written, to the current directory. The file holds
exactly what was printed on stdout.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from rbee.config import rbee_home

log = logging.getLogger(__name__)


def partial_dir(env: dict[str, str] | None = None) -> Path:
    return rbee_home(env) / "partial"


def _file_name(request_id: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", request_id)[:64] or "request"
    return f"{stamp}-{safe_id}.partial.txt"


def save_partial(text: str, request_id: str, folder: Path | None = None) -> Path | None:
    """Write ``text`` into ``folder`` (default: partial_dir()), falling back to
    the current directory; the file, or None when no place was writable."""
    name = _file_name(request_id)
    for folder in (folder or partial_dir(), Path.cwd()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path.resolve()
        except OSError as exc:
            log.debug("cannot save partial result in %s: %s", folder, exc)
    return None


def tokens_generated(tokens: int, max_tokens: int) -> str:
    return f"{tokens} / {max_tokens}"
