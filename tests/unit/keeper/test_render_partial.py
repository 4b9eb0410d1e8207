"""Token printing, the summary line and partial-result files."""

from __future__ import annotations

import io
from pathlib import Path

from rbee.narration import Narrator, progress_event
from rbee.v1 import common_pb2, inference_pb2

from rbee_keeper.partial import save_partial, tokens_generated
from rbee_keeper.render import LoadingView, TokenPrinter, summary_line


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def delta(text: str, *ids: int) -> inference_pb2.TokenDelta:
    return inference_pb2.TokenDelta(text=text, token_ids=list(ids))


def test_printer_counts_tokens_not_messages():
    out = io.StringIO()
    printer = TokenPrinter(out)
    printer.write(delta("Hel", 1))
    printer.write(delta("lo wor", 2, 3, 4))
    assert (printer.tokens, printer.messages, printer.text) == (4, 2, "Hello wor")
    assert out.getvalue() == "Hello wor"


def test_printer_ends_the_answer_with_one_newline_on_a_pipe_and_a_terminal():
    pipe, tty = io.StringIO(), Tty()
    for out in (pipe, tty):
        printer = TokenPrinter(out)
        printer.write(delta("answer", 1))
        printer.end_line()
        printer.end_line()
    assert pipe.getvalue() == "answer\n"
    assert tty.getvalue() == "answer\n"
    done = io.StringIO()
    printer = TokenPrinter(done)
    printer.write(delta("line\n", 1))
    printer.end_line()
    assert done.getvalue() == "line\n"


def test_summary_line():
    line = summary_line(40, 2.0, 120.4, "length")
    assert line == "40 tokens in 2.00s (20.0 tokens/s, first token after 120 ms, finish: length)"
    assert "0.0 tokens/s" in summary_line(0, 0.0, None, "stop")


def test_loading_view_without_terminal_narrates_each_change_once():
    err = io.StringIO()
    view = LoadingView("127.0.0.1:7910", Narrator("rbee-keeper", stream=err))
    progress = progress_event("weights", 3, 6, unit="stages", message="Loading weights")
    view.update(progress)
    view.update(progress)
    view.update(progress_event("ready", 6, 6, unit="stages"))
    view.close()
    lines = err.getvalue().splitlines()
    assert lines == [
        "[rbee-keeper] ⏳ 127.0.0.1:7910 loading: weights · Loading weights · 3/6 stages",
        "[rbee-keeper] ⏳ 127.0.0.1:7910 loading: ready · 6/6 stages",
    ]


def test_partial_file_holds_the_text_and_a_safe_name(tmp_path):
    path = save_partial("Once upon a ", "keeper-../../x", tmp_path / "partial")
    assert path is not None and path.parent == (tmp_path / "partial").resolve()
    assert path.name.endswith("-keeper-.._.._x.partial.txt")
    assert path.read_text() == "Once upon a "
    assert tokens_generated(3, 100) == "3 / 100"


def test_partial_file_falls_back_to_the_current_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.chdir(tmp_path)
    path = save_partial("text", "r1", blocked / "partial")
    assert path is not None and path.parent == Path(tmp_path).resolve()


def test_loading_narration_replaces_the_progress_line_it_repeats():
    err = io.StringIO()
    view = LoadingView("w:1", Narrator("rbee-keeper", stream=err))
    progress = progress_event("weights", 3, 6, unit="stages")
    narration = common_pb2.NarrationEvent(actor="model-loader", emoji="⏳", message="[3/6] weights")
    view.show(inference_pb2.StreamLoadingProgressResponse(progress=progress, narration=narration))
    view.show(inference_pb2.StreamLoadingProgressResponse(progress=progress))
    view.show(inference_pb2.StreamLoadingProgressResponse(progress=progress_event("ready", 6, 6)))
    assert err.getvalue().splitlines() == [
        "[model-loader] ⏳ [3/6] weights",
        "[rbee-keeper] ⏳ w:1 loading: ready · 6/6",
    ]


def test_loading_view_on_a_terminal_draws_a_bar_and_clears_it():
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    err = io.StringIO()
    view = LoadingView("127.0.0.1:7910", Narrator("rbee-keeper", stream=err), console=console)
    view.update(progress_event("weights", 3, 6, unit="stages"))
    view.narration(common_pb2.NarrationEvent(actor="model-loader", emoji="⏳", message="Loading weights"))
    view.update(progress_event("kv_cache", 4, 6, unit="stages"))
    view.close()
    drawn = screen.getvalue()
    assert "weights · 3/6 stages" in drawn or "kv_cache · 4/6 stages" in drawn
    assert "[model-loader] ⏳ Loading weights" in drawn
    assert err.getvalue() == ""  # on a terminal, nothing goes through the line narrator
