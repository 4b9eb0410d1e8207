"""rbee-keeper: the command line for users and operators.

Every warm request pays the keeper's start-up, so a run imports only the
command it runs: `rbee-keeper infer ...` loads the infer command (and gRPC),
`rbee-keeper --version` none at all. Help, completion and anything not
recognised load every command. `app` (the whole CLI) stays importable for
tests and tools.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import typer

from rbee.cli_common import run_app
from rbee.config import VERSION

# Command name -> module (in the order --help lists them).
COMMANDS = {
    "infer": "infer",
    "workers": "workers",
    "models": "models",
    "logs": "logs",
    "setup": "setup",
    "keys": "keys",
    "status": "status",
    "install": "install",
}
# Root options that take a value (the next word is not a command).
_ROOT_WITH_VALUE = ("--install-completion", "--show-completion")

HELP = """Run LLMs across the machines of your home lab: stream tokens from a model on any node.

Results (tokens, listings, --json) go to stdout; narration and progress to stderr.
Exit codes: 0 success, 1 error (with a stable code and what to do next), 130 interrupted.

Settings: a command-line option beats the environment, which beats the config file.
Config file (TOML), the first found of: $RBEE_CONFIG, ~/.config/rbee/config.toml,
/etc/rbee/config.toml. Section \\[keeper]: node (RBEE_NODE), queen (RBEE_QUEEN),
hive (RBEE_HIVE), api_key (RBEE_API_KEY), queen_api_key (RBEE_QUEEN_API_KEY),
tls (RBEE_TLS: auto = mutual TLS to addresses beyond loopback, on, off).
Section \\[remote]: hive_program and repo_dir, where rbee lives on the nodes.
`rbee-keeper install` writes a commented default file.

Example: rbee-keeper infer --node workstation --model hf:HuggingFaceTB/SmolLM2-135M-Instruct --prompt "Why do bees dance?"
"""

def _new_app() -> typer.Typer:
    app = typer.Typer(name="rbee-keeper", help=HELP, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)
    app.callback()(root)
    return app


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rbee-keeper {VERSION}")
        raise typer.Exit()


def root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print results and errors only: no narration on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print debug lines: config file, key sources, connection attempts."),
) -> None:
    """Root options (given before the command: rbee-keeper --quiet infer ...)."""
    from rbee_keeper.output import set_level

    set_level(quiet, verbose)


def build_app(only: tuple[str, ...] | None = None) -> typer.Typer:
    """The CLI with every command, or with ``only`` these."""
    app = _new_app()
    for name in only if only is not None else tuple(COMMANDS):
        importlib.import_module(f"rbee_keeper.commands.{COMMANDS[name]}").register(app)
    return app


class _PlainCoercion:
    """What typer does for an option of a plain type (str, int, float, bool,
    Path, a list of str), without building a pydantic TypeAdapter per option:
    recent typer validates every value through pydantic, which costs a
    keeper run 150-300 ms of imports and schema building for options that are
    text or a number. Ranges (min/max) are checked as typer does."""

    def __init__(self, annotation: type, info: object) -> None:
        self.annotation = annotation
        self.min = getattr(info, "min", None)
        self.max = getattr(info, "max", None)

    def coerce(self, value, param, ctx):
        from typer._click.exceptions import BadParameter  # the click typer raises its errors with

        if value is None:
            return () if param.multiple or param.nargs == -1 else None
        if param.multiple or param.nargs == -1:
            return tuple(str(v) for v in value)
        kind = self.annotation
        if kind is bool or kind is str:
            return value if isinstance(value, kind) else kind(value)
        if kind is Path:
            return value if isinstance(value, Path) else Path(value)
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise BadParameter(f"{value!r} is not a valid {'integer' if kind is int else 'number'}.", ctx=ctx, param=param) from None
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            bounds = f"{self.min if self.min is not None else ''}<=x<={self.max if self.max is not None else ''}".strip("<=")
            raise BadParameter(f"{value} is not in the range {bounds}.", ctx=ctx, param=param)
        return number


def plain_coercion(command) -> None:
    """Give the plain-typed options of ``command`` (and its subcommands) the
    light coercion above; anything else keeps typer's own. A typer without
    this runtime layer is left alone."""
    params = list(getattr(command, "params", ()))
    try:  # --help is made (and cached) on first use; make it now so it is light too
        from typer._click import Context

        help_option = command.get_help_option(Context(command, info_name=command.name))
        if help_option is not None:
            params.append(help_option)
    except Exception:  # pragma: no cover - another typer: leave its help option as it is
        pass
    for param in params:
        desc = getattr(param, "type_descriptor", None)
        if desc is None or not hasattr(param, "_runtime_param") or getattr(desc, "file_annotation", None) is not None:
            continue
        annotation = desc.annotation
        if annotation in (str, int, float, bool, Path) and not getattr(desc.parameter_info, "clamp", False):
            param._runtime_param = _PlainCoercion(annotation, desc.parameter_info)
        elif annotation == list[str]:
            param._runtime_param = _PlainCoercion(str, desc.parameter_info)
    for sub in getattr(command, "commands", {}).values():
        plain_coercion(sub)


def wanted(argv: list[str]) -> tuple[str, ...] | None:
    """The commands a run needs: () for root options alone (--version), the
    one command named, or None (all) for help, completion and the unknown."""
    if any(k.startswith("_RBEE_KEEPER_COMPLETE") for k in os.environ):
        return None
    words = iter(argv)
    for word in words:
        if word in ("--help", "-h"):
            return None
        if word in _ROOT_WITH_VALUE:
            next(words, None)
            return None
        if not word.startswith("-"):
            return (word,) if word in COMMANDS else None
    return () if argv else None


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        return build_app()
    raise AttributeError(name)


def main() -> None:
    run_app(build_app(wanted(sys.argv[1:])), "rbee-keeper", prepare=plain_coercion)


if __name__ == "__main__":
    main()
