"""How much the keeper says and how: the root options --quiet and --verbose,
and colour only where it helps.

stdout carries results only (tokens, listings, JSON); everything the keeper
narrates goes to stderr. --quiet drops the narration (errors are still
printed, with their code and suggestions); --verbose adds debug lines (which
config file, which key source, each connection attempt). Colour is used only
when stderr is a terminal and NO_COLOR is not set (https://no-color.org).

Kept free of heavy imports: every command, even --version, loads it.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

QUIET = 0
NORMAL = 1
VERBOSE = 2

_level = NORMAL


def set_level(quiet: bool, verbose: bool) -> None:
    global _level
    _level = QUIET if quiet else (VERBOSE if verbose else NORMAL)
    if _level == VERBOSE:
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="[rbee-keeper] 🔍 %(name)s: %(message)s")


def level() -> int:
    return _level


def quiet() -> bool:
    return _level == QUIET


def verbose() -> bool:
    return _level == VERBOSE


def use_color(stream: TextIO | None = None, env: dict[str, str] | None = None) -> bool:
    """Colour on ``stream`` (default stderr): a terminal, and NO_COLOR unset or empty."""
    env = os.environ if env is None else env
    if env.get("NO_COLOR"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


NULL = _Null()


def narration_stream() -> TextIO:
    """Where narration goes: stderr, or nowhere with --quiet."""
    return NULL if quiet() else sys.stderr  # type: ignore[return-value]


def say(emoji: str, message: str) -> None:
    """One narration line on stderr (nothing with --quiet)."""
    if not quiet():
        print(f"[rbee-keeper] {emoji} {message}", file=sys.stderr, flush=True)


def debug(message: str) -> None:
    """A line shown with --verbose only."""
    if verbose():
        print(f"[rbee-keeper] 🔍 {message}", file=sys.stderr, flush=True)
