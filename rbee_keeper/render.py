"""What the user sees: tokens on stdout (and nothing else there), narration
and loading progress on stderr."""

from __future__ import annotations

import io
import os
import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from rbee.narration import Narrator, format_line
from rbee.v1 import common_pb2, inference_pb2

from rbee_keeper.output import quiet as _quiet
from rbee_keeper.common import ACTOR


def narrator(stream: TextIO | None = None) -> Narrator:
    """Narration on stderr (or ``stream``); nowhere with --quiet."""
    from rbee_keeper.output import narration_stream, quiet

    if quiet():
        return Narrator(ACTOR, stream=narration_stream())
    return Narrator(ACTOR, stream=stream if stream is not None else sys.stderr)


class OutputClosed(Exception):
    """Whoever read our stdout went away (e.g. ``| head``)."""


class TokenPrinter:
    """Writes each delta to stdout as it arrives and keeps what was written,
    so an interrupted answer can be saved."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out if out is not None else sys.stdout
        self._parts: list[str] = []
        self._ended = False
        self.tokens = 0
        self.messages = 0

    def write(self, delta: inference_pb2.TokenDelta) -> None:
        self.tokens += len(delta.token_ids)
        self.messages += 1
        if delta.text:
            self._parts.append(delta.text)
            try:
                self._out.write(delta.text)
                self._out.flush()
            except BrokenPipeError:
                self._silence()
                raise OutputClosed from None

    def _silence(self) -> None:
        # Point stdout at /dev/null so the interpreter's last flush at exit
        # does not complain about the same closed pipe.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._out.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def end_line(self) -> None:
        """End the answer with a newline (once), so what follows on the
        terminal starts on its own line and a file holds a complete line."""
        if self._parts and not self.text.endswith("\n") and not self._ended:
            self._ended = True
            try:
                self._out.write("\n")
                self._out.flush()
            except BrokenPipeError:
                self._silence()


def _progress_text(p: common_pb2.ProgressEvent) -> str:
    parts = [p.stage or "loading"]
    if p.message:
        parts.append(p.message)
    if p.total:
        parts.append(f"{p.done}/{p.total} {p.unit}".rstrip())
    elif p.done:
        parts.append(f"{p.done} {p.unit}".rstrip())
    return " · ".join(parts)


class LoadingView:
    """Loading progress of a worker: a live bar on a terminal, one narration
    line per change otherwise (logs and pipes stay readable)."""

    def __init__(self, worker: str, narrate: Narrator, console: Console | None = None) -> None:
        self._worker = worker
        self._narrate = narrate
        self._console = console if console is not None else Console(stderr=True, highlight=False, quiet=_quiet())
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_line = ""

    def update(self, p: common_pb2.ProgressEvent) -> None:
        if self._console.is_terminal:
            self._update_bar(p)
            return
        line = _progress_text(p)
        if line != self._last_line:
            self._last_line = line
            self._narrate("⏳", f"{self._worker} loading: {line}")

    def show(self, msg: inference_pb2.StreamLoadingProgressResponse) -> None:
        """One message of the loading stream. Without a terminal, a message
        that carries the worker's own narration is shown as that line only:
        its progress says the same thing."""
        has_progress = msg.HasField("progress")
        if msg.HasField("narration"):
            self.narration(msg.narration)
            if has_progress and not self._console.is_terminal:
                self._last_line = _progress_text(msg.progress)
                return
        if has_progress:
            self.update(msg.progress)

    def narration(self, ev: common_pb2.NarrationEvent) -> None:
        if self._progress is not None:
            self._progress.console.print(format_line(ev), markup=False, highlight=False)
        else:
            self._narrate.emit(ev)

    def _update_bar(self, p: common_pb2.ProgressEvent) -> None:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn(f"[{ACTOR}] loading model on {self._worker}:"),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=self._console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(p.stage or "loading", total=None)
        assert self._task is not None
        self._progress.update(
            self._task,
            description=_progress_text(p),
            completed=p.done,
            total=p.total or None,
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_line(tokens: int, seconds: float, ttft_ms: float | None, finish_reason: str) -> str:
    rate = tokens / seconds if seconds > 0 else 0.0
    parts = [f"{tokens} tokens in {seconds:.2f}s ({rate:.1f} tokens/s"]
    if ttft_ms is not None:
        parts.append(f", first token after {ttft_ms:.0f} ms")
    parts.append(f", finish: {finish_reason or 'unknown'})")
    return "".join(parts)
