"""What every console script shares: turning RbeeError into a clear message
and a stable exit code, never a traceback.

Imports stay light (no rich, no gRPC at import time): a program's start-up
pays for this module on every command, even ``--version``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

from rbee.config import VERSION

if TYPE_CHECKING:
    import typer

    from rbee.errors import RbeeError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# Error lines in red on a terminal; plain in files and pipes, and with NO_COLOR set.
_RED, _RESET = "\033[31m", "\033[0m"


def _color(stream) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def print_error(err: "RbeeError", actor: str) -> None:
    out = sys.stderr
    head = f"[{actor}] ❌ {err.code}: {err.message}"
    lines = [f"{_RED}{head}{_RESET}" if _color(out) else head]
    for key, value in err.details.items():
        parts = value.splitlines()
        if len(parts) > 1:  # captured output (a build's, a program's): one line each, indented
            lines.append(f"    {key}:")
            lines.extend(f"      {line}" for line in parts)
        else:
            lines.append(f"    {key}: {value}")
    lines.extend(f"    → {suggestion}" for suggestion in err.suggestions)
    try:
        out.write("\n".join(lines) + "\n")
        out.flush()
    except (BrokenPipeError, ValueError):
        pass


def fail(err: "RbeeError", actor: str) -> NoReturn:
    print_error(err, actor)
    sys.exit(EXIT_ERROR)


def make_app(name: str, help: str) -> "typer.Typer":
    """A program's root command: help when run without arguments, --version,
    no shell-completion commands, and no rich tracebacks (errors are printed
    by run_app and the commands, with their codes)."""
    import typer

    app = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"{name} {VERSION}")
            raise typer.Exit()

    @app.callback()
    def root(
        version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True, help="Print the version and exit."),
    ) -> None:
        """Root options."""

    return app


def run_app(app: "typer.Typer", actor: str, prepare=None) -> NoReturn:
    """Run a typer app with the project's exit codes: usage mistakes (unknown
    option, missing argument) become USAGE_ERROR and exit 1, like every other
    bad input, instead of click's exit 2."""
    import typer

    try:  # recent typer carries its own copy of click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_exc

    command = typer.main.get_command(app)
    if prepare is not None:  # a program's chance to adjust its click command before parsing
        prepare(command)
    try:
        result = command.main(prog_name=actor, standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        # The error was built from ctx.get_help(), which with rich help has
        # already printed the help and returned ""; print only what is left.
        if exc.format_message().strip():
            typer.echo(exc.format_message())
        sys.exit(EXIT_OK)
    except click_exc.UsageError as exc:
        from rbee.errors import RbeeError

        hint = f"Run `{exc.ctx.command_path} --help` for the accepted options" if exc.ctx else f"Run `{actor} --help`"
        print_error(RbeeError("USAGE_ERROR", exc.format_message(), suggestions=[hint]), actor)
        sys.exit(EXIT_ERROR)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except click_exc.ClickException as exc:
        from rbee.errors import RbeeError

        print_error(RbeeError("INVALID_ARGUMENT", exc.format_message()), actor)
        sys.exit(EXIT_ERROR)
    sys.exit(result if isinstance(result, int) else EXIT_OK)


def run_daemon(actor: str, serve: "Callable[[], Coroutine[Any, Any, int]]") -> NoReturn:
    """Run a daemon's main coroutine with the project's exit codes: RbeeError →
    its message and exit 1; anything unexpected → INTERNAL with the exception's
    type (the traceback stays in the log), exit 1; else the coroutine's code."""
    import asyncio
    import logging

    from rbee.errors import RbeeError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(serve())
    except RbeeError as err:
        print_error(err, actor)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - the log keeps the traceback, the user gets a message
        logging.getLogger(actor).debug("%s failed", actor, exc_info=True)
        print_error(RbeeError("INTERNAL", f"{actor} stopped on an unexpected error: {type(exc).__name__}"), actor)
        sys.exit(EXIT_ERROR)
    sys.exit(code)
