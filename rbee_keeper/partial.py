"""Keeping what was generated when a stream breaks (S9).

The text goes to ``$RBEE_HOME/partial/<UTC time>-<request id>.partial.txt``
(the folder 0700, the file 0600); when that folder cannot be written, to the
current directory. The file holds exactly what was printed on stdout.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from rbee.config import rbee_home
from rbee.errors import RbeeError
from rbee.paths import confined, private_dir, write_private

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
    for place in (folder or partial_dir(), Path.cwd()):
        try:
            # The text is what the model answered someone: theirs alone (0600,
            # the partial folder 0700); the name cannot leave the folder.
            if place != Path.cwd():
                private_dir(place, tighten=False)
            path = write_private(confined(place, name, what="Partial result"), text)
            return path.resolve()
        except (OSError, RbeeError) as exc:
            log.debug("cannot save partial result in %s: %s", place, exc)
    return None


def tokens_generated(tokens: int, max_tokens: int) -> str:
    return f"{tokens} / {max_tokens}"
