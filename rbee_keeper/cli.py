"""rbee-keeper: the command line for users and operators."""

from __future__ import annotations

import typer

from rbee.cli_common import run_app
from rbee.config import VERSION

from rbee_keeper.commands import infer, install, logs, models, setup, status, workers

HELP = """Run LLMs across the machines of your home lab: stream tokens from a model on any node.

Results (tokens, listings, --json) go to stdout; narration and progress to stderr.
Exit codes: 0 success, 1 error (with a stable code and what to do next), 130 interrupted.

Settings: a command-line option beats the environment, which beats the config file.
Config file (TOML), the first found of: $RBEE_CONFIG, ~/.config/rbee/config.toml,
/etc/rbee/config.toml. Section \\[keeper]: node (RBEE_NODE), queen (RBEE_QUEEN),
hive (RBEE_HIVE), api_key (RBEE_API_KEY), queen_api_key (RBEE_QUEEN_API_KEY).
Section \\[remote]: hive_program and repo_dir, where rbee lives on the nodes.
`rbee-keeper install` writes a commented default file.

Example: rbee-keeper infer --node workstation --model hf:HuggingFaceTB/SmolLM2-135M-Instruct --prompt "Why do bees dance?"
"""

app = typer.Typer(
    name="rbee-keeper", help=HELP, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rbee-keeper {VERSION}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print results and errors only: no narration on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print debug lines: config file, key sources, connection attempts."),
) -> None:
    """Root options (given before the command: rbee-keeper --quiet infer ...)."""
    from rbee_keeper.output import set_level

    set_level(quiet, verbose)


infer.register(app)
workers.register(app)
models.register(app)
logs.register(app)
setup.register(app)
status.register(app)
install.register(app)


def main() -> None:
    run_app(app, "rbee-keeper")


if __name__ == "__main__":
    main()
