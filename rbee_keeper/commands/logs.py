"""`rbee-keeper logs`: a node's daemon and worker logs, streamed until Ctrl+C."""

from __future__ import annotations

import sys

import typer

from rbee_keeper.common import HIVE_KEY_OPTION, HIVE_OPTION, run
from rbee_keeper.hive_client import HiveClient


async def _logs(hive: str, api_key: str | None, worker: str, tail: int, follow: bool) -> int:
    async with HiveClient.connect(hive, api_key) as client:
        async for item in client.logs(worker_id=worker, tail_lines=tail, follow=follow):
            # Log lines are the command's output: stdout, one per line, source first.
            sys.stdout.write(f"{item.source} | {item.line.rstrip()}\n")
            sys.stdout.flush()
    return 0


def logs(
    hive: str = HIVE_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    worker: str = typer.Option("", "--worker", help="Only this worker's log (default: the hive's log and every worker's)."),
    tail: int = typer.Option(50, "--tail", min=1, help="Lines of history per log."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming new lines until Ctrl+C."),
) -> None:
    """Print a node's logs (the hive and its workers); --follow streams new lines until Ctrl+C."""
    run(_logs(hive, api_key, worker, tail, follow))


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
