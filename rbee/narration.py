"""Narration: one-line events ``[actor] emoji message``.

Daemons print them on stdout (their log); keeper prints them on stderr, since
stdout carries tokens only. Events cross the wire as ``rbee.v1.Event``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rbee.enum_words import LEVELS, STAGES, UNITS
from rbee.v1 import common_pb2


def event(actor: str, emoji: str, message: str, level: str = "info") -> common_pb2.NarrationEvent:
    """A narration line; ``level`` is "info", "warn" or "error" (the wire's NarrationEvent.Level)."""
    return common_pb2.NarrationEvent(
        actor=actor, emoji=emoji, message=message, unix_ms=int(time.time() * 1000), severity=LEVELS.number(level)
    )


def level_of(ev: common_pb2.NarrationEvent) -> str:
    """"info", "warn" or "error"; "info" when unset or a level this build does not know."""
    return LEVELS.word(ev.severity)


def progress_event(
    stage: str, done: int, total: int, unit: str = "", rate: float = 0.0, message: str = ""
) -> common_pb2.ProgressEvent:
    """A progress event; ``stage`` and ``unit`` are words of ProgressEvent.Stage and .Unit
    ("download", "weights", ...; "bytes", "stages"), "" for none."""
    return common_pb2.ProgressEvent(
        current_stage=STAGES.number(stage),
        done=done,
        total=total,
        count_unit=UNITS.number(unit),
        rate=rate,
        message=message,
    )


def stage_of(p: common_pb2.ProgressEvent) -> str:
    """The stage's word ("download", "weights", ...); "" when unset or unknown to this build."""
    return STAGES.word(p.current_stage)


def unit_of(p: common_pb2.ProgressEvent) -> str:
    """"bytes" or "stages"; "" when unset or unknown to this build."""
    return UNITS.word(p.count_unit)


def format_line(ev: common_pb2.NarrationEvent) -> str:
    emoji = f"{ev.emoji} " if ev.emoji else ""
    return f"[{ev.actor}] {emoji}{ev.message}"


def parse_line(line: str) -> common_pb2.NarrationEvent | None:
    """Read back a line a process printed (e.g. a worker's stdout before its
    server is up). None when the line is not narration."""
    line = line.rstrip("\n")
    if not line.startswith("[") or "] " not in line:
        return None
    actor, _, rest = line[1:].partition("] ")
    if not actor or " " in actor:
        return None
    emoji, sep, message = rest.partition(" ")
    if sep and emoji and not emoji[0].isascii():
        return event(actor, emoji, message)
    return event(actor, "", rest)


class Narrator:
    """Prints narration for one actor; optional sinks receive each event too
    (e.g. a stream being relayed to a client)."""

    def __init__(self, actor: str, stream: TextIO | None = None) -> None:
        self.actor = actor
        self._stream = stream
        self._sinks: list = []

    def add_sink(self, sink) -> None:  # sink(NarrationEvent)
        self._sinks.append(sink)

    def __call__(self, emoji: str, message: str, level: str = "info", actor: str | None = None) -> common_pb2.NarrationEvent:
        ev = event(actor or self.actor, emoji, message, level)
        self.emit(ev)
        return ev

    def emit(self, ev: common_pb2.NarrationEvent) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            print(format_line(ev), file=stream, flush=True)
        except (OSError, ValueError):
            # The reader is gone (a worker whose hive died: its stdout is a
            # broken pipe). Narration must not stop what it narrates, e.g. the
            # shutdown that the hive's death started.
            pass
        for sink in list(self._sinks):
            sink(ev)
