"""What every console script shares: turning RbeeError into a clear message
and a stable exit code, never a traceback."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console

from rbee.config import VERSION
from rbee.errors import RbeeError

if TYPE_CHECKING:
    import typer

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(err: RbeeError, actor: str) -> None:
    stderr.print(f"[{actor}] ❌ {err.code}: {err.message}", markup=False)
    for key, value in err.details.items():
        lines = value.splitlines()
        if len(lines) > 1:  # captured output (a build's, a program's): one line each, indented
            stderr.print(f"    {key}:", markup=False)
            for line in lines:
                stderr.print(f"      {line}", markup=False)
        else:
            stderr.print(f"    {key}: {value}", markup=False)
    for suggestion in err.suggestions:
        stderr.print(f"    → {suggestion}", markup=False)


def fail(err: RbeeError, actor: str) -> NoReturn:
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


def run_app(app: "typer.Typer", actor: str) -> NoReturn:
    """Run a typer app with the project's exit codes: usage mistakes (unknown
    option, missing argument) become USAGE_ERROR and exit 1, like every other
    bad input, instead of click's exit 2."""
    import typer

    try:  # recent typer carries its own copy of click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_exc

    command = typer.main.get_command(app)
    try:
        result = command.main(prog_name=actor, standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        # The error was built from ctx.get_help(), which with rich help has
        # already printed the help and returned ""; print only what is left.
        if exc.format_message().strip():
            typer.echo(exc.format_message())
        sys.exit(EXIT_OK)
    except click_exc.UsageError as exc:
        hint = f"Run `{exc.ctx.command_path} --help` for the accepted options" if exc.ctx else f"Run `{actor} --help`"
        print_error(RbeeError("USAGE_ERROR", exc.format_message(), suggestions=[hint]), actor)
        sys.exit(EXIT_ERROR)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except click_exc.ClickException as exc:
        print_error(RbeeError("INVALID_ARGUMENT", exc.format_message()), actor)
        sys.exit(EXIT_ERROR)
    sys.exit(result if isinstance(result, int) else EXIT_OK)
