"""What the user sees: tokens on stdout (and nothing else there), narration
and loading progress on stderr."""

from __future__ import annotations

import io
import os
import sys
from datetime import datetime
from typing import TextIO

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when a progress view is made, not at start-up
    from rich.console import Console
    from rich.progress import Progress, TaskID

from rbee.narration import Narrator, format_line, stage_of, unit_of
from rbee.v1 import common_pb2, inference_pb2

from rbee_keeper.output import quiet as _quiet
from rbee_keeper.common import ACTOR


def local_time(unix_ms: int, seconds: bool = False, unset: str = "-") -> str:
    """A contract's timestamp (unix milliseconds, docs/architecture.md) as local time
    for a table; ``unset`` where it is 0."""
    if not unix_ms:
        return unset
    return datetime.fromtimestamp(unix_ms / 1000).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def narrator(stream: TextIO | None = None) -> Narrator:
    """Narration on stderr (or ``stream``); nowhere with --quiet."""
    from rbee_keeper.output import narration_stream, quiet

    if quiet():
        return Narrator(ACTOR, stream=narration_stream())
    return Narrator(ACTOR, stream=stream if stream is not None else sys.stderr)


class OutputClosed(Exception):
    """Whoever read our stdout went away (e.g. ``| head``)."""


# `infer --json`: the answer is collected and printed as one JSON object at
# the end instead of streamed (set by the infer command, read by TokenPrinter).
_json_answer = False


def set_json_answer(on: bool) -> None:
    global _json_answer
    _json_answer = on


def finish_reason(final: inference_pb2.GenerateFinal) -> str:
    """The final message's finish reason as a word ("stop", "length", ...).
    The contract moved it from a string to an enum (`reason`); both are read."""
    fields = final.DESCRIPTOR.fields_by_name
    if "reason" in fields and fields["reason"].enum_type is not None:
        name = fields["reason"].enum_type.values_by_number[final.reason].name  # type: ignore[attr-defined]
        return name.removeprefix("FINISH_REASON_").lower()
    return getattr(final, "finish_reason", "") or "unknown"


class TokenPrinter:
    """Writes each delta to stdout as it arrives and keeps what was written,
    so an interrupted answer can be saved. With `infer --json` nothing is
    streamed: finished() prints one JSON object instead."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.json = _json_answer and out is None
        self._stdout = out if out is not None else sys.stdout
        from rbee_keeper.output import NULL

        self._out = NULL if self.json else self._stdout  # type: ignore[assignment]
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

    def finished(
        self, final: inference_pb2.GenerateFinal, worker: str, elapsed_s: float, ttft_ms: float | None, extra: dict | None = None
    ) -> None:
        """With --json: the answer as one object on stdout (text, finish reason,
        token counts, timings); nothing otherwise (the tokens are already out)."""
        if not self.json:
            return
        import json

        answer = {
            "text": self.text,
            "finish_reason": finish_reason(final),
            "tokens_generated": final.tokens_generated or self.tokens,
            "prompt_tokens": final.prompt_tokens,
            "duration_ms": final.duration_ms,
            "time_to_first_token_ms": final.time_to_first_token_ms,
            "keeper_elapsed_ms": round(elapsed_s * 1000, 1),
            "keeper_time_to_first_token_ms": round(ttft_ms, 1) if ttft_ms is not None else None,
            "worker": worker,
            "request_id": final.request_id,
            **(extra or {}),
        }
        try:
            self._stdout.write(json.dumps(answer) + "\n")
            self._stdout.flush()
        except BrokenPipeError:
            self._silence()

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
    parts = [stage_of(p) or "loading"]
    if p.message:
        parts.append(p.message)
    if p.total:
        parts.append(f"{p.done}/{p.total} {unit_of(p)}".rstrip())
    elif p.done:
        parts.append(f"{p.done} {unit_of(p)}".rstrip())
    return " · ".join(parts)


class LoadingView:
    """Loading progress of a worker: a live bar on a terminal, one narration
    line per change otherwise (logs and pipes stay readable)."""

    def __init__(self, worker: str, narrate: Narrator, console: Console | None = None) -> None:
        self._worker = worker
        self._narrate = narrate
        if console is None:
            from rich.console import Console

            console = Console(stderr=True, highlight=False, quiet=_quiet())
        self._console = console
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
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
            self._task = self._progress.add_task(stage_of(p) or "loading", total=None)
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
