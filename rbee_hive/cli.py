"""rbee-hive: the pool manager daemon of one node, and its local tools."""

from __future__ import annotations

import typer

from rbee.cli_common import run_app
from rbee.config import VERSION

from rbee_hive.commands import daemon, models

app = typer.Typer(
    name="rbee-hive",
    help="The node's pool manager: detects what the node has, checks resources, runs workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
daemon.register(app)
models.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rbee-hive {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Root options."""


def main() -> None:
    run_app(app, "rbee-hive")


if __name__ == "__main__":
    main()
