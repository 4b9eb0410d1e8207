"""Server-sent events as OpenAI's streams write them: ``data: {json}`` lines
separated by a blank line, ``data: [DONE]`` at the end, and ``: comment``
lines (clients ignore them; proxies see a live connection)."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def comment(text: str) -> str:
    # One line: a newline inside would end the comment and start a field.
    return ": " + " ".join(str(text).split()) + "\n\n"
