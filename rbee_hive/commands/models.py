"""Placeholder: this command group is not built yet."""

import typer


def register(app: typer.Typer) -> None:
    """Adds nothing until the commands are built."""
