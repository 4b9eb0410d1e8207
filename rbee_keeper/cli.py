"""rbee-keeper: the command line for users and operators."""

from __future__ import annotations

import typer

from rbee.cli_common import run_app
from rbee.config import VERSION

from rbee_keeper.commands import infer, logs, models, workers

app = typer.Typer(
    name="rbee-keeper",
    help="Run LLMs across the machines of your home lab: stream tokens from a model on any node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
infer.register(app)
workers.register(app)
models.register(app)
logs.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rbee-keeper {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Root options."""


def main() -> None:
    run_app(app, "rbee-keeper")


if __name__ == "__main__":
    main()
