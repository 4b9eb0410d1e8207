"""`rbee-hive models`: local model tools of a node."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from rbee.cli_common import EXIT_ERROR, print_error
from rbee.errors import RbeeError
from rbee.narration import Narrator

ACTOR = "rbee-hive"

models_app = typer.Typer(help="Local model tools: the default model, GGUF import.", no_args_is_help=True)


def _narrator() -> Narrator:
    return Narrator(ACTOR, stream=sys.stderr)


@models_app.command("fetch-default")
def fetch_default(
    force: bool = typer.Option(False, "--force", help="Import again even if the folder exists."),
) -> None:
    """Obtain SmolLM2-135M-Instruct into $RBEE_HOME/models (reused when present)."""
    from rbee_hive.default_model import ensure_default_model

    narrate = _narrator()
    try:
        path = ensure_default_model(narrate, force=force)
    except RbeeError as err:
        print_error(err, ACTOR)
        raise typer.Exit(EXIT_ERROR) from None
    typer.echo(str(path))


@models_app.command("import-gguf")
def import_gguf_cmd(
    gguf: Path = typer.Argument(..., help="The .gguf file to import."),
    out: Path = typer.Option(..., "--out", help="Folder to create (safetensors + tokenizer)."),
) -> None:
    """Dequantize a GGUF file into a folder the vLLM engine loads."""
    from rbee_hive.gguf_import import import_gguf

    try:
        path = import_gguf(gguf, out, _narrator())
    except RbeeError as err:
        print_error(err, ACTOR)
        raise typer.Exit(EXIT_ERROR) from None
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
